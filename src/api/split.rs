//! What a split should look like ([`Shape`]) and the share a pair of weights gives ([`percent_of`]), whichever router writes it.

use serde_json::Value;

/// What a split should look like: the recording side is the recording subset (Istio) or the
/// recording Service (Gateway API), the stable side the stable subset or Service.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Shape<'a> {
    /// Share of the requests sent (mirrored, with `mirror`) to the recording side.
    pub percent: i32,
    /// Mirror mode: every response comes from the stable side; `percent` of the requests are
    /// copied to the recording side.
    pub mirror: bool,
    /// Requests always sent (mirrored) to the recording side: Istio-shaped match entries, as
    /// `ValidSpec::always` holds them. Empty while the clone may get no traffic.
    pub always: &'a [Value],
    /// Requests never sent (nor mirrored) to it; wins over `always`.
    pub never: &'a [Value],
}

impl Shape<'static> {
    /// A plain weighted split at `percent`, without forced or excluded requests.
    pub fn weights(percent: i32) -> Self {
        Shape {
            percent,
            mirror: false,
            always: &[],
            never: &[],
        }
    }
}

/// `rec` as a share of `rec + stable`, in percent, rounded half up; 0 when both are 0. In i128,
/// so that weights near `i64::MAX` cannot overflow.
pub fn percent_of(rec: i64, stable: i64) -> i32 {
    let (rec, w) = (i128::from(rec), i128::from(rec) + i128::from(stable));
    if w <= 0 {
        return 0;
    }
    i32::try_from((rec * 100 + w / 2) / w).unwrap_or(100)
}

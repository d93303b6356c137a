//! [`Shape`]: what a split should look like, whichever router writes it.

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

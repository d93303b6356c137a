//! The values of the status fields that are not free text.

/// Who labels the target's new pods `recordingcanary.dev/role: stable` (`status.stableLabelling`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StableLabelling {
    /// The API server, at admission (the policy and its binding exist).
    AdmissionPolicy,
    /// Only this controller, while it runs.
    #[default]
    Controller,
}

impl StableLabelling {
    pub fn as_str(self) -> &'static str {
        match self {
            StableLabelling::AdmissionPolicy => "AdmissionPolicy",
            StableLabelling::Controller => "Controller",
        }
    }
}

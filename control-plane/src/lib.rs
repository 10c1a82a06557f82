//! tokn$ control plane. Today: the envelope encryption of seller credentials at rest; the
//! service (store, admin API, config push) is built on it by the control-plane issue.

pub mod sealing;

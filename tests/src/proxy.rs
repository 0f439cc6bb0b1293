//! The fault-injecting TCP proxy (see the liveness tests).

//! ringrelay

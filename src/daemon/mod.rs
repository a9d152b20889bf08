//! The rmount daemon: one process holding every mount, the layer indexes
//! and the chunk cache, controlled over a Unix socket.

pub mod metrics;

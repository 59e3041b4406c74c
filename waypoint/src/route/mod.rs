//! VirtualService routing (to be written).

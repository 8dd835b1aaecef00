//! Realistic disk images (placeholder, being written).

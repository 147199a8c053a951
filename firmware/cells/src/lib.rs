//! borg-cells (in progress)

//! borg-net (in progress)

//! borg-system (in progress)

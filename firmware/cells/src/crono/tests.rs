//! The cronoTree cell against the runtime's inputs, with a paused clock.

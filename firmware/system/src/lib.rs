//! # borg-system: the platform layer of a BorgIOS node
//!
//! Everything that touches the machine lives here, and this is the only crate of the workspace
//! allowed `unsafe` (all of it in [`sys`], each block with a `// SAFETY:` comment).
//!
//! - [`init`]: PID 1 (`borg init`) and `borg up`: mounts, signals, the single reaper, orderly
//!   shutdown and `reboot(2)`; ties the pieces below together.
//! - [`supervisor`]: supervised processes (on the appliance: the one node process), capped
//!   exponential backoff (pure policy function),
//!   exit statuses dispatched by pid from the one reaper.
//! - [`mounts`]: /proc, /sys, /dev, ..., kernel modules, the persistent data partition.
//! - [`net`] + [`dhcp`]: loopback, first Ethernet link, a sans-IO DHCPv4 client and its I/O.
//! - [`leds`]: status LED patterns (pure mapping) and the sysfs / GPIO / simulator backends.
//! - [`console`]: the `borg> ` diagnostics prompt on the serial console.
//! - [`monitor`]: a tiny HTTP client for the local cell monitor (`/status`).
//! - [`hwclock`]: the clock floor at boot, setting the clock from network time, DATA/nettime.
//! - [`slots`], [`update`], [`trial`]: A/B boot slots; installing an approved release into
//!   the inactive slot; the trial boot's health check, commit or fall back.
//! - [`cmdline`], [`logring`], [`state`]: kernel command line, log ring, shared state.
#![allow(unsafe_code)]

pub mod cmdline;
pub mod console;
pub mod dhcp;
pub mod hwclock;
pub mod init;
pub mod leds;
pub mod logring;
pub mod monitor;
pub mod mounts;
pub mod net;
pub mod slots;
pub mod state;
pub mod supervisor;
pub mod sys;
pub mod trial;
pub mod update;

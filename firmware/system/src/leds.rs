//! Status LEDs: one blink pattern per appliance state, three backends.
//!
//! Two LEDs are driven: **status** (the Pi's green ACT LED, or GPIO 17) and **power** (the red
//! PWR LED, or GPIO 27). Patterns (period in brackets; `#` = on for 100 ms, `.` = off 100 ms):
//!
//! | state      | status LED                      | power LED            |
//! |------------|---------------------------------|----------------------|
//! | booting    | fast blink 5 Hz `#.`            | on                   |
//! | no link    | off                             | slow blink 1 Hz      |
//! | no address | one short flash per second      | on                   |
//! | alone      | two short flashes per 2 s       | on                   |
//! | joined     | on                              | on                   |
//! | root       | on, short dark blip every 2 s   | on                   |
//! | updating   | alternating with power, 2 Hz    | alternating          |
//! | fault      | off                             | fast blink 5 Hz      |
//!
//! [`state_for`] maps what the appliance knows (link, address, node state, fault) to a
//! [`LedState`]; [`level_at`] says whether an LED is lit at a given time. Both are pure.
//! Backends: [`SysfsLeds`] (`/sys/class/leds`), `GpioLeds` (rppal, feature `gpio`) and
//! [`SimLeds`] (writes the state to a file, for tests).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// Errors of the LED backends.
#[derive(Debug, thiserror::Error)]
pub enum LedError {
    /// A sysfs or simulator file could not be written.
    #[error("LED file {path}: {source}")]
    File { path: PathBuf, source: io::Error },
    /// No LED of this backend exists on this machine.
    #[error("no LEDs found: {0}")]
    NotFound(String),
    /// GPIO access failed.
    #[error("GPIO: {0}")]
    Gpio(String),
    /// A backend spec (`borg.leds=...`) was not understood.
    #[error("unknown LED backend '{0}' (use sysfs, gpio, sim:PATH or none)")]
    BadSpec(String),
}

/// The appliance states the LEDs show.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LedState {
    /// PID 1 is starting.
    Booting,
    /// No Ethernet link (cable unplugged).
    NoLink,
    /// Link, but no DHCP lease yet.
    NoAddress,
    /// Address, node running, but root of a tree of one (or still joining).
    Alone,
    /// Member of a larger tree.
    Joined,
    /// Root of a tree with other members.
    Root,
    /// Installing an update.
    Updating,
    /// Something needs attention (data partition damaged, base cell crash-looping).
    Fault,
}

impl LedState {
    /// All states, in documentation order.
    pub const ALL: [LedState; 8] = [
        LedState::Booting,
        LedState::NoLink,
        LedState::NoAddress,
        LedState::Alone,
        LedState::Joined,
        LedState::Root,
        LedState::Updating,
        LedState::Fault,
    ];

    /// Lower-case name, as shown on the console and in the simulator file.
    pub fn name(&self) -> &'static str {
        match self {
            LedState::Booting => "booting",
            LedState::NoLink => "no_link",
            LedState::NoAddress => "no_address",
            LedState::Alone => "alone",
            LedState::Joined => "joined",
            LedState::Root => "root",
            LedState::Updating => "updating",
            LedState::Fault => "fault",
        }
    }

    /// The blink pattern of this state.
    pub fn pattern(&self) -> Pattern {
        use Step::{Off, On};
        const SOLID: &[Step] = &[On(1000)];
        const DARK: &[Step] = &[Off(1000)];
        match self {
            LedState::Booting => Pattern {
                status: &[On(100), Off(100)],
                power: SOLID,
            },
            LedState::NoLink => Pattern {
                status: DARK,
                power: &[On(500), Off(500)],
            },
            LedState::NoAddress => Pattern {
                status: &[On(100), Off(900)],
                power: SOLID,
            },
            LedState::Alone => Pattern {
                status: &[On(100), Off(200), On(100), Off(1600)],
                power: SOLID,
            },
            LedState::Joined => Pattern {
                status: SOLID,
                power: SOLID,
            },
            LedState::Root => Pattern {
                status: &[On(1900), Off(100)],
                power: SOLID,
            },
            LedState::Updating => Pattern {
                status: &[On(250), Off(250)],
                power: &[Off(250), On(250)],
            },
            LedState::Fault => Pattern {
                status: DARK,
                power: &[On(100), Off(100)],
            },
        }
    }
}

/// One step of a blink pattern, with its duration in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Step {
    /// Lit for this many ms.
    On(u32),
    /// Dark for this many ms.
    Off(u32),
}

/// The repeating patterns of both LEDs for one state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pattern {
    /// Status (ACT, green) LED.
    pub status: &'static [Step],
    /// Power (PWR, red) LED.
    pub power: &'static [Step],
}

/// Whether a repeating pattern is lit `t_ms` after the state was entered.
pub fn level_at(steps: &[Step], t_ms: u64) -> bool {
    let period: u64 = steps
        .iter()
        .map(|s| match s {
            Step::On(d) | Step::Off(d) => u64::from(*d),
        })
        .sum();
    if period == 0 {
        return false;
    }
    let mut t = t_ms % period;
    for s in steps {
        let (on, d) = match s {
            Step::On(d) => (true, u64::from(*d)),
            Step::Off(d) => (false, u64::from(*d)),
        };
        if t < d {
            return on;
        }
        t -= d;
    }
    false
}

/// The node's tree state as reported by its monitor (`"state"` in `/status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeState {
    /// Looking for a tree.
    Joining,
    /// Root of a tree of one.
    Alone,
    /// Root of a larger tree.
    Root,
    /// Member of a tree.
    Joined,
}

impl NodeState {
    /// Parse the monitor's `"state"` string.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "joining" => Some(NodeState::Joining),
            "alone" => Some(NodeState::Alone),
            "root" => Some(NodeState::Root),
            "joined" => Some(NodeState::Joined),
            _ => None,
        }
    }
}

/// Everything the LED state depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Inputs {
    /// PID 1 finished its early boot (mounts, first cell start).
    pub booted: bool,
    /// Ethernet carrier present.
    pub link: bool,
    /// A DHCP lease is configured.
    pub address: bool,
    /// The base cell's state, if its monitor answered.
    pub node: Option<NodeState>,
    /// An update is being installed.
    pub updating: bool,
    /// A fault was raised.
    pub fault: bool,
}

/// Map what the appliance knows to the LED state. Fault wins, then updating, then the boot
/// sequence (link, address), then the node's own state. A node whose monitor has not answered
/// yet (or that is still joining) shows "alone": it is running on its own.
pub fn state_for(i: &Inputs) -> LedState {
    if i.fault {
        return LedState::Fault;
    }
    if i.updating {
        return LedState::Updating;
    }
    if !i.booted {
        return LedState::Booting;
    }
    if !i.link {
        return LedState::NoLink;
    }
    if !i.address {
        return LedState::NoAddress;
    }
    match i.node {
        Some(NodeState::Root) => LedState::Root,
        Some(NodeState::Joined) => LedState::Joined,
        Some(NodeState::Alone) | Some(NodeState::Joining) | None => LedState::Alone,
    }
}

/// Which LED.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Led {
    /// Green/status.
    Status,
    /// Red/power.
    Power,
}

/// A backend that can switch the two LEDs.
pub trait StatusLeds: Send {
    /// Backend name for the console (`sysfs`, `gpio`, `sim`, `none`).
    fn name(&self) -> String;
    /// Switch one LED.
    fn set(&mut self, led: Led, on: bool) -> Result<(), LedError>;
    /// Called when the shown state changes (the simulator records it).
    fn state_changed(&mut self, _state: LedState) -> Result<(), LedError> {
        Ok(())
    }
}

/// No LEDs at all.
#[derive(Debug, Default)]
pub struct NoLeds;

impl StatusLeds for NoLeds {
    fn name(&self) -> String {
        "none".into()
    }
    fn set(&mut self, _led: Led, _on: bool) -> Result<(), LedError> {
        Ok(())
    }
}

fn write_file(path: &Path, text: &str) -> Result<(), LedError> {
    fs::write(path, text).map_err(|source| LedError::File {
        path: path.to_path_buf(),
        source,
    })
}

/// Linux LED class devices (`/sys/class/leds/ACT`, `/sys/class/leds/PWR`).
#[derive(Debug)]
pub struct SysfsLeds {
    status: Option<PathBuf>,
    power: Option<PathBuf>,
}

impl SysfsLeds {
    /// Find the Pi's ACT/PWR LEDs under `root` (normally `/sys/class/leds`), take them over
    /// from their kernel triggers.
    pub fn open(root: &Path) -> Result<Self, LedError> {
        let find = |names: &[&str]| {
            names
                .iter()
                .map(|n| root.join(n))
                .find(|p| p.join("brightness").exists())
        };
        let status = find(&["ACT", "led0", "act"]);
        let power = find(&["PWR", "led1", "pwr"]);
        if status.is_none() && power.is_none() {
            return Err(LedError::NotFound(format!(
                "no ACT/PWR LED under {}",
                root.display()
            )));
        }
        for p in [&status, &power].into_iter().flatten() {
            write_file(&p.join("trigger"), "none")?;
        }
        Ok(SysfsLeds { status, power })
    }
}

impl StatusLeds for SysfsLeds {
    fn name(&self) -> String {
        "sysfs".into()
    }
    fn set(&mut self, led: Led, on: bool) -> Result<(), LedError> {
        let p = match led {
            Led::Status => &self.status,
            Led::Power => &self.power,
        };
        match p {
            Some(p) => write_file(&p.join("brightness"), if on { "1" } else { "0" }),
            None => Ok(()),
        }
    }
}

/// File-backed simulator: the file always holds `state=<name> status=<0|1> power=<0|1>`.
#[derive(Debug)]
pub struct SimLeds {
    path: PathBuf,
    state: LedState,
    status: bool,
    power: bool,
}

impl SimLeds {
    /// Create the simulator writing to `path`.
    pub fn new(path: PathBuf) -> Result<Self, LedError> {
        let s = SimLeds {
            path,
            state: LedState::Booting,
            status: false,
            power: false,
        };
        s.flush()?;
        Ok(s)
    }

    fn flush(&self) -> Result<(), LedError> {
        let text = format!(
            "state={} status={} power={}\n",
            self.state.name(),
            u8::from(self.status),
            u8::from(self.power)
        );
        let tmp = self.path.with_extension("tmp");
        write_file(&tmp, &text)?;
        fs::rename(&tmp, &self.path).map_err(|source| LedError::File {
            path: self.path.clone(),
            source,
        })
    }
}

impl StatusLeds for SimLeds {
    fn name(&self) -> String {
        format!("sim:{}", self.path.display())
    }
    fn set(&mut self, led: Led, on: bool) -> Result<(), LedError> {
        match led {
            Led::Status => self.status = on,
            Led::Power => self.power = on,
        }
        self.flush()
    }
    fn state_changed(&mut self, state: LedState) -> Result<(), LedError> {
        self.state = state;
        self.flush()
    }
}

/// Raspberry Pi GPIO LEDs through rppal (`/dev/gpiomem`).
#[cfg(feature = "gpio")]
pub struct GpioLeds {
    status: rppal::gpio::OutputPin,
    power: rppal::gpio::OutputPin,
}

#[cfg(feature = "gpio")]
impl GpioLeds {
    /// Claim the two BCM pins as outputs.
    pub fn open(status_pin: u8, power_pin: u8) -> Result<Self, LedError> {
        let g = rppal::gpio::Gpio::new().map_err(|e| LedError::Gpio(e.to_string()))?;
        let status = g
            .get(status_pin)
            .map_err(|e| LedError::Gpio(e.to_string()))?
            .into_output_low();
        let power = g
            .get(power_pin)
            .map_err(|e| LedError::Gpio(e.to_string()))?
            .into_output_low();
        Ok(GpioLeds { status, power })
    }
}

#[cfg(feature = "gpio")]
impl StatusLeds for GpioLeds {
    fn name(&self) -> String {
        format!("gpio:{},{}", self.status.pin(), self.power.pin())
    }
    fn set(&mut self, led: Led, on: bool) -> Result<(), LedError> {
        let pin = match led {
            Led::Status => &mut self.status,
            Led::Power => &mut self.power,
        };
        if on {
            pin.set_high();
        } else {
            pin.set_low();
        }
        Ok(())
    }
}

/// Default BCM pins of the GPIO backend (status, power).
pub const DEFAULT_GPIO_PINS: (u8, u8) = (17, 27);

/// Parse `borg.led_gpio=17,27`.
pub fn parse_gpio_pins(s: &str) -> Option<(u8, u8)> {
    let (a, b) = s.split_once(',')?;
    let a: u8 = a.trim().parse().ok()?;
    let b: u8 = b.trim().parse().ok()?;
    (a <= 53 && b <= 53 && a != b).then_some((a, b))
}

/// Open a backend from a spec: `sysfs`, `gpio` (pins from `gpio_pins`), `sim:PATH`, `none`, or
/// `auto` (sysfs if present, else none).
pub fn open_backend(spec: &str, gpio_pins: (u8, u8)) -> Result<Box<dyn StatusLeds>, LedError> {
    match spec {
        "none" => Ok(Box::new(NoLeds)),
        "sysfs" => Ok(Box::new(SysfsLeds::open(Path::new("/sys/class/leds"))?)),
        "auto" => match SysfsLeds::open(Path::new("/sys/class/leds")) {
            Ok(l) => Ok(Box::new(l)),
            Err(_) => Ok(Box::new(NoLeds)),
        },
        "gpio" => open_gpio(gpio_pins),
        s => match s.strip_prefix("sim:") {
            Some(p) if !p.is_empty() => Ok(Box::new(SimLeds::new(PathBuf::from(p))?)),
            _ => Err(LedError::BadSpec(s.to_string())),
        },
    }
}

#[cfg(feature = "gpio")]
fn open_gpio(pins: (u8, u8)) -> Result<Box<dyn StatusLeds>, LedError> {
    Ok(Box::new(GpioLeds::open(pins.0, pins.1)?))
}

#[cfg(not(feature = "gpio"))]
fn open_gpio(_pins: (u8, u8)) -> Result<Box<dyn StatusLeds>, LedError> {
    Err(LedError::Gpio(
        "this build has no GPIO support (cargo feature borg-system/gpio)".into(),
    ))
}

/// Drives a backend: call [`LedDriver::render`] periodically (every ~50 ms) with the current
/// state and a millisecond clock; it switches LEDs only when their level changes.
pub struct LedDriver {
    backend: Box<dyn StatusLeds>,
    state: Option<LedState>,
    since_ms: u64,
    levels: (Option<bool>, Option<bool>),
}

impl LedDriver {
    /// Wrap a backend.
    pub fn new(backend: Box<dyn StatusLeds>) -> Self {
        LedDriver {
            backend,
            state: None,
            since_ms: 0,
            levels: (None, None),
        }
    }

    /// Backend name.
    pub fn backend_name(&self) -> String {
        self.backend.name()
    }

    /// Show `state` at time `now_ms`.
    pub fn render(&mut self, state: LedState, now_ms: u64) -> Result<(), LedError> {
        if self.state != Some(state) {
            self.state = Some(state);
            self.since_ms = now_ms;
            self.backend.state_changed(state)?;
        }
        let t = now_ms.saturating_sub(self.since_ms);
        let pat = state.pattern();
        let s = level_at(pat.status, t);
        let p = level_at(pat.power, t);
        if self.levels.0 != Some(s) {
            self.backend.set(Led::Status, s)?;
            self.levels.0 = Some(s);
        }
        if self.levels.1 != Some(p) {
            self.backend.set(Led::Power, p)?;
            self.levels.1 = Some(p);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Inputs {
        Inputs {
            booted: true,
            link: true,
            address: true,
            node: Some(NodeState::Alone),
            updating: false,
            fault: false,
        }
    }

    #[test]
    fn mapping_follows_the_boot_sequence() {
        let mut i = base();
        assert_eq!(state_for(&i), LedState::Alone);
        i.node = Some(NodeState::Root);
        assert_eq!(state_for(&i), LedState::Root);
        i.node = Some(NodeState::Joined);
        assert_eq!(state_for(&i), LedState::Joined);
        i.node = Some(NodeState::Joining);
        assert_eq!(state_for(&i), LedState::Alone);
        i.node = None;
        assert_eq!(state_for(&i), LedState::Alone);
        i.address = false;
        assert_eq!(state_for(&i), LedState::NoAddress);
        i.link = false;
        assert_eq!(state_for(&i), LedState::NoLink);
        i.booted = false;
        assert_eq!(state_for(&i), LedState::Booting);
        i.updating = true;
        assert_eq!(state_for(&i), LedState::Updating);
        i.fault = true;
        assert_eq!(state_for(&i), LedState::Fault);
    }

    #[test]
    fn node_states_parse() {
        assert_eq!(NodeState::parse("root"), Some(NodeState::Root));
        assert_eq!(NodeState::parse("joined"), Some(NodeState::Joined));
        assert_eq!(NodeState::parse("alone"), Some(NodeState::Alone));
        assert_eq!(NodeState::parse("joining"), Some(NodeState::Joining));
        assert_eq!(NodeState::parse("ROOT"), None);
    }

    #[test]
    fn levels_follow_the_pattern() {
        let p = LedState::Booting.pattern();
        assert!(level_at(p.status, 0));
        assert!(level_at(p.status, 99));
        assert!(!level_at(p.status, 100));
        assert!(level_at(p.status, 200));
        assert!(level_at(p.power, 12345));
        let a = LedState::Alone.pattern().status;
        let lit: Vec<u64> = (0..20)
            .map(|i| i * 100)
            .filter(|t| level_at(a, *t))
            .collect();
        assert_eq!(lit, vec![0, 300]);
        assert!(!level_at(&[], 5));
    }

    #[test]
    fn every_state_has_a_distinct_pattern() {
        let mut seen = std::collections::HashSet::new();
        for s in LedState::ALL {
            let p = s.pattern();
            assert!(
                seen.insert((p.status, p.power)),
                "{} reuses a pattern",
                s.name()
            );
        }
    }

    #[test]
    fn simulator_records_state_and_levels() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("leds");
        let mut d = LedDriver::new(Box::new(SimLeds::new(path.clone()).unwrap()));
        d.render(LedState::NoLink, 1000).unwrap();
        assert_eq!(
            fs::read_to_string(&path).unwrap(),
            "state=no_link status=0 power=1\n"
        );
        d.render(LedState::NoLink, 1600).unwrap();
        assert_eq!(
            fs::read_to_string(&path).unwrap(),
            "state=no_link status=0 power=0\n"
        );
        d.render(LedState::Joined, 1700).unwrap();
        assert_eq!(
            fs::read_to_string(&path).unwrap(),
            "state=joined status=1 power=1\n"
        );
    }

    #[test]
    fn sysfs_backend_takes_over_triggers() {
        let dir = tempfile::tempdir().unwrap();
        for n in ["ACT", "PWR"] {
            fs::create_dir(dir.path().join(n)).unwrap();
            fs::write(dir.path().join(n).join("brightness"), "0").unwrap();
            fs::write(dir.path().join(n).join("trigger"), "mmc0").unwrap();
        }
        let mut l = SysfsLeds::open(dir.path()).unwrap();
        assert_eq!(
            fs::read_to_string(dir.path().join("ACT/trigger")).unwrap(),
            "none"
        );
        l.set(Led::Power, true).unwrap();
        assert_eq!(
            fs::read_to_string(dir.path().join("PWR/brightness")).unwrap(),
            "1"
        );
        assert!(SysfsLeds::open(&dir.path().join("nothing")).is_err());
    }

    #[test]
    fn gpio_pins_parse() {
        assert_eq!(parse_gpio_pins("17,27"), Some((17, 27)));
        assert_eq!(parse_gpio_pins(" 5 , 6"), Some((5, 6)));
        assert_eq!(parse_gpio_pins("17"), None);
        assert_eq!(parse_gpio_pins("17,17"), None);
        assert_eq!(parse_gpio_pins("99,1"), None);
        assert!(matches!(
            open_backend("bogus", DEFAULT_GPIO_PINS),
            Err(LedError::BadSpec(_))
        ));
    }
}

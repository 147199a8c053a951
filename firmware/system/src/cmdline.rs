//! Kernel command line (`/proc/cmdline`) settings for the appliance: `borg.*` keys.
//!
//! | key              | meaning                                             | default            |
//! |------------------|-----------------------------------------------------|--------------------|
//! | `borg.join`      | contact `IP:PORT` (repeat or comma-separate)        | none               |
//! | `borg.listen`    | address the base cell listens on                    | cell's default     |
//! | `borg.data`      | data partition device                               | probe (see mounts) |
//! | `borg.leds`      | `auto`, `sysfs`, `gpio`, `sim:PATH`, `none`         | `auto`             |
//! | `borg.led_gpio`  | BCM pins `STATUS,POWER` for `gpio`                  | `17,27`            |
//! | `borg.loglevel`  | tracing filter for the console                      | `info`             |
//! | `borg.grace_ms`  | per-cell shutdown grace                             | `5000`             |
//! | `borg.net`       | `dhcp` or `off`                                     | `dhcp`             |
//! | `borg.boot`      | A/B boot disk(s), first that exists (MBR: autoboot) | mmcblk1,0 (Pi)     |
//! | `borg.partition` | partition this boot came from (QEMU stand-in)       | device tree (Pi)   |
//! | `borg.tryboot`   | `1`: this is a trial boot (QEMU stand-in)           | device tree (Pi)   |
//! | `borg.trial_s`   | seconds a trial boot has to pass the health check   | `180`              |
//! | `borg.update_via`| node receptor `IP[:PORT]` the installer fetches via  | the local node     |
//! | `borg.fault`     | test only: `node` (node never starts), `trial_hang` | none               |

/// Parsed `borg.*` settings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cmdline {
    /// Contacts to join.
    pub join: Vec<String>,
    /// Listen address for the base cell.
    pub listen: Option<String>,
    /// Data device.
    pub data: Option<String>,
    /// LED backend.
    pub leds: Option<String>,
    /// LED GPIO pins.
    pub led_gpio: Option<String>,
    /// Log filter.
    pub loglevel: Option<String>,
    /// Shutdown grace per cell, ms.
    pub grace_ms: Option<u64>,
    /// Networking mode.
    pub net: Option<String>,
    /// The A/B boot disk.
    pub boot: Option<String>,
    /// Partition booted (QEMU stand-in for the Pi firmware's device tree).
    pub partition: Option<u8>,
    /// Trial boot (QEMU stand-in).
    pub tryboot: Option<bool>,
    /// Trial health-check bound, seconds.
    pub trial_s: Option<u64>,
    /// Test-only fault injection.
    pub fault: Option<String>,
    /// Node receptor for fetching release images.
    pub update_via: Option<String>,
}

/// Parse a kernel command line. Unknown keys are ignored; quoting is not supported (the
/// kernel passes `borg.*` values verbatim and none of ours contain spaces).
pub fn parse(text: &str) -> Cmdline {
    let mut c = Cmdline::default();
    for word in text.split_whitespace() {
        let Some((k, v)) = word.split_once('=') else {
            continue;
        };
        match k {
            "borg.join" => c
                .join
                .extend(v.split(',').filter(|s| !s.is_empty()).map(str::to_string)),
            "borg.listen" => c.listen = Some(v.to_string()),
            "borg.data" => c.data = Some(v.to_string()),
            "borg.leds" => c.leds = Some(v.to_string()),
            "borg.led_gpio" => c.led_gpio = Some(v.to_string()),
            "borg.loglevel" => c.loglevel = Some(v.to_string()),
            "borg.grace_ms" => c.grace_ms = v.parse().ok(),
            "borg.net" => c.net = Some(v.to_string()),
            "borg.boot" => c.boot = Some(v.to_string()),
            "borg.partition" => c.partition = v.parse().ok(),
            "borg.tryboot" => c.tryboot = Some(v == "1"),
            "borg.trial_s" => c.trial_s = v.parse().ok(),
            "borg.fault" => c.fault = Some(v.to_string()),
            "borg.update_via" => c.update_via = Some(v.to_string()),
            _ => {}
        }
    }
    c
}

/// Read and parse `/proc/cmdline` (empty settings if unreadable).
pub fn read() -> Cmdline {
    std::fs::read_to_string("/proc/cmdline")
        .map(|t| parse(&t))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_borg_keys() {
        let c = parse(
            "console=ttyAMA0 quiet borg.join=10.0.2.2:13300,1.2.3.4:13300 borg.join=5.6.7.8:1 \
             borg.led_gpio=5,6 borg.leds=gpio borg.grace_ms=200 borg.grace_ms2=x borg.data=/dev/vdb",
        );
        assert_eq!(c.join, vec!["10.0.2.2:13300", "1.2.3.4:13300", "5.6.7.8:1"]);
        assert_eq!(c.led_gpio.as_deref(), Some("5,6"));
        assert_eq!(c.leds.as_deref(), Some("gpio"));
        assert_eq!(c.grace_ms, Some(200));
        assert_eq!(c.data.as_deref(), Some("/dev/vdb"));
        assert_eq!(parse(""), Cmdline::default());
    }
}

//! Ethernet (MAC) addresses, the key every boot file and DHCP entry hangs on.

use std::fmt;
use std::str::FromStr;

/// A 48-bit Ethernet address.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct Mac(pub [u8; 6]);

impl Mac {
    /// `aa-bb-cc-dd-ee-ff`, lowercase: the spelling of pxelinux config names
    /// (after the `01-` ARP type) and of iPXE's `${mac:hexhyp}`.
    pub fn dashed(&self) -> String {
        self.to_string().replace(':', "-")
    }

    /// The address `n` further on, counting the six bytes as one number; `None`
    /// past ff:ff:ff:ff:ff:ff. Ranges of nodes with consecutive NICs use it.
    pub fn offset(&self, n: u64) -> Option<Mac> {
        let mut wide = [0u8; 8];
        wide[2..].copy_from_slice(&self.0);
        let v = u64::from_be_bytes(wide).checked_add(n)?;
        if v >= 1 << 48 {
            return None;
        }
        let mut out = [0u8; 6];
        out.copy_from_slice(&v.to_be_bytes()[2..]);
        Some(Mac(out))
    }

    /// Group (multicast) addresses can never be a NIC's own address.
    pub fn is_multicast(&self) -> bool {
        self.0[0] & 1 == 1
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

/// Why a string is not a MAC address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadMac(pub String);

impl fmt::Display for BadMac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "`{}` is not a MAC address; write six hex pairs like 52:54:00:0a:00:01",
            self.0
        )
    }
}

impl std::error::Error for BadMac {}

impl FromStr for Mac {
    type Err = BadMac;

    /// Accepts `aa:bb:cc:dd:ee:ff`, `aa-bb-cc-dd-ee-ff` and `aabbccddeeff`, any case:
    /// the spellings switches, BIOS screens and DHCP logs use.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || BadMac(s.to_string());
        let hex: String = if s.contains(':') || s.contains('-') {
            let parts: Vec<&str> = s.split([':', '-']).collect();
            if parts.len() != 6 || parts.iter().any(|p| p.len() != 2) {
                return Err(bad());
            }
            parts.concat()
        } else {
            s.to_string()
        };
        if hex.len() != 12 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad());
        }
        let mut out = [0u8; 6];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
        }
        Ok(Mac(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_common_spellings() {
        let want = Mac([0x52, 0x54, 0, 0xab, 0, 1]);
        for s in ["52:54:00:ab:00:01", "52-54-00-AB-00-01", "525400ab0001"] {
            assert_eq!(s.parse::<Mac>().unwrap(), want, "{s}");
        }
        assert_eq!(want.to_string(), "52:54:00:ab:00:01");
        assert_eq!(want.dashed(), "52-54-00-ab-00-01");
    }

    #[test]
    fn rejects_garbage() {
        for s in [
            "",
            "52:54:00:ab:00",
            "52:54:00:ab:00:0g",
            "5:54:00:ab:00:01:02",
            "1:2:3:4:5:6",
        ] {
            assert!(s.parse::<Mac>().is_err(), "{s}");
        }
    }

    #[test]
    fn offset_carries_and_stops_at_the_end() {
        let m: Mac = "52:54:00:00:00:ff".parse().unwrap();
        assert_eq!(m.offset(1).unwrap().to_string(), "52:54:00:00:01:00");
        let last: Mac = "ff:ff:ff:ff:ff:fe".parse().unwrap();
        assert!(last.offset(1).is_some());
        assert!(last.offset(2).is_none());
    }
}

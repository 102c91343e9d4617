//! Identifiers: newtypes so a node, a connection and an epoch are never confused.

use core::fmt;

/// A node's place-independent identity in one session, assigned by the source
/// at its first join and kept when the node rejoins under the same name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeId(pub u32);

/// Shown as `#14`: cluster nodes are often named `n14`, and a message that
/// named a node by its join order in that style read as a different node.
impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// A connection as the shell names it. The shell assigns these, unique for the
/// life of the process; the core uses them to address replies to peers it does
/// not know yet (before a join is admitted).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ConnId(pub u64);

impl fmt::Display for ConnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "c{}", self.0)
    }
}

/// The generation of the topology. Every relink bumps it, and a data
/// connection carries the epoch it was made for, so a connection made for an
/// older topology is refused instead of feeding the wrong node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Epoch(pub u64);

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "e{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_id_does_not_read_as_a_node_name() {
        assert_eq!(NodeId(14).to_string(), "#14");
        assert_eq!(Epoch(3).to_string(), "e3");
    }
}

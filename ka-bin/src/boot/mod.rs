//! Boot pieces: the inventory, per-node boot modes, boot configs rendered
//! from them, DHCP configuration and MAC harvesting.
//!
//! The flow, as in the original Ka: harvest MACs while powering nodes on in
//! order ([`harvest`]), write them into the inventory ([`inventory`]), hand
//! the DHCP server its static leases ([`dhcp`]), set nodes to `install`
//! ([`modes`]), and let `ka tftp` serve each node the config [`render`]
//! produces for its mode, and each install-mode node its own key
//! ([`keys`]). When a node's clone is verified, the source calls
//! [`modes::BootState::clone_verified`] and the node's next boot is local
//! (and its key is served no more).

pub mod dhcp;
pub mod doctor;
pub mod flip;
pub mod harvest;
pub mod hostlist;
pub mod inventory;
pub mod keys;
pub mod mac;
pub mod modes;
pub mod render;

pub use inventory::{Inventory, InventoryNode};
pub use mac::Mac;
pub use modes::{BootState, Mode};

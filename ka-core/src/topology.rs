//! Who feeds whom: a tree rooted at the source, a chain when the arity is 1.
//!
//! The tree knows only its shape; the source decides every placement by
//! whether the upstream it picks still holds what the node lacks
//! ([`Source::holds`](crate::source::Source::holds)), and the crate root
//! says why repair always succeeds
//! ([What keeps repair always possible](crate#what-keeps-repair-always-possible)).
//! The moves it offers:
//! - a node that leaves hands its children to its own parent
//!   ([`Topology::remove`]): their nearest live ancestor, which holds
//!   everything they lack unless it keeps only a bounded window;
//! - a node that arrives (late, or after a restart) goes to the first place in
//!   breadth-first order with room ([`Topology::open_slots`]), which for a
//!   chain is the tail;
//! - a node whose upstream no longer holds what it lacks moves, with the
//!   nodes it feeds, under the source ([`Topology::relink`]). The source may
//!   so feed more than `arity` children; it then has no open slot, and
//!   newcomers go to the first node with room.

use std::collections::{BTreeMap, VecDeque};

use crate::ids::NodeId;

/// A parent in the tree: the source or a node.
pub type Parent = Option<NodeId>;

/// The data-flow tree over the placed nodes.
#[derive(Debug, Clone, Default)]
pub struct Topology {
    arity: usize,
    parent: BTreeMap<NodeId, Parent>,
    children: BTreeMap<Parent, Vec<NodeId>>,
}

impl Topology {
    /// An empty tree where each node feeds at most `arity` children.
    pub fn new(arity: u32) -> Self {
        Topology {
            arity: arity.max(1) as usize,
            ..Default::default()
        }
    }

    /// Lays `order` out as a complete `arity`-ary tree under the source:
    /// position `j` (1-based, the source is 0) is fed by position `(j-1)/arity`.
    /// With arity 1 that is the chain `source → order[0] → order[1] → …`.
    pub fn build(arity: u32, order: &[NodeId]) -> Self {
        let mut t = Topology::new(arity);
        for (i, &n) in order.iter().enumerate() {
            let j = i + 1;
            let p = (j - 1) / t.arity;
            let parent = if p == 0 { None } else { Some(order[p - 1]) };
            t.attach(n, parent);
        }
        t
    }

    /// Whether `node` has a place.
    pub fn contains(&self, node: NodeId) -> bool {
        self.parent.contains_key(&node)
    }

    /// Who feeds `node`, if it is placed.
    pub fn parent(&self, node: NodeId) -> Option<Parent> {
        self.parent.get(&node).copied()
    }

    /// Whom `parent` feeds.
    pub fn children(&self, parent: Parent) -> &[NodeId] {
        self.children.get(&parent).map_or(&[], Vec::as_slice)
    }

    /// The number of placed nodes.
    pub fn len(&self) -> usize {
        self.parent.len()
    }

    /// Whether no node is placed.
    pub fn is_empty(&self) -> bool {
        self.parent.is_empty()
    }

    /// Places `node` under `parent`.
    pub fn attach(&mut self, node: NodeId, parent: Parent) {
        debug_assert!(!self.contains(node), "{node} placed twice");
        self.parent.insert(node, parent);
        self.children.entry(parent).or_default().push(node);
    }

    /// Takes `node` out, handing its children to its parent in its place.
    /// Returns the children that changed upstream.
    pub fn remove(&mut self, node: NodeId) -> Vec<NodeId> {
        let Some(parent) = self.parent.remove(&node) else {
            return Vec::new();
        };
        let orphans = self.children.remove(&Some(node)).unwrap_or_default();
        let siblings = self.children.entry(parent).or_default();
        // The orphans take the removed node's position among its siblings, so a
        // chain keeps its order.
        let at = siblings
            .iter()
            .position(|&c| c == node)
            .expect("child listed under its parent");
        siblings.splice(at..=at, orphans.iter().copied());
        if siblings.is_empty() {
            self.children.remove(&parent);
        }
        for &o in &orphans {
            self.parent.insert(o, parent);
        }
        orphans
    }

    /// Moves `node`, with every node it feeds, under `parent`: for a node
    /// whose upstream can no longer serve it while it can still serve its
    /// own downstreams. `parent` may already have `arity` children (the
    /// source takes whoever no one else can feed), and must not be `node`
    /// or below it.
    pub fn relink(&mut self, node: NodeId, parent: Parent) {
        let Some(old) = self.parent.get(&node).copied() else {
            return;
        };
        debug_assert!(
            parent.is_none_or(|p| p != node && !self.ancestors(p).any(|a| a == node)),
            "{node} moved below itself"
        );
        if old == parent {
            return;
        }
        let siblings = self
            .children
            .get_mut(&old)
            .expect("child listed under its parent");
        siblings.retain(|&c| c != node);
        if siblings.is_empty() {
            self.children.remove(&old);
        }
        self.parent.insert(node, parent);
        self.children.entry(parent).or_default().push(node);
    }

    /// The parents with room for one more child, in breadth-first order from
    /// the source: the first of them is where a newcomer belongs.
    pub fn open_slots(&self) -> impl Iterator<Item = Parent> + '_ {
        self.breadth_first()
            .filter(move |p| self.children(*p).len() < self.arity)
    }

    /// Every parent, the source first, then nodes in breadth-first order.
    pub fn breadth_first(&self) -> impl Iterator<Item = Parent> + '_ {
        let mut queue: VecDeque<Parent> = VecDeque::from([None]);
        core::iter::from_fn(move || {
            let p = queue.pop_front()?;
            queue.extend(self.children(p).iter().map(|&c| Some(c)));
            Some(p)
        })
    }

    /// The nodes from `node` up to (not including) the source.
    pub fn ancestors(&self, node: NodeId) -> impl Iterator<Item = NodeId> + '_ {
        let mut cur = self.parent(node).flatten();
        core::iter::from_fn(move || {
            let n = cur?;
            cur = self.parent(n).flatten();
            Some(n)
        })
    }

    /// Checks the tree's own consistency: every placed node is reachable from
    /// the source exactly once and the parent and child maps agree. Returns a
    /// description of the first violation.
    pub fn check(&self) -> Result<(), String> {
        let mut seen = 0usize;
        for p in self.breadth_first() {
            if let Some(n) = p {
                seen += 1;
                if seen > self.parent.len() {
                    return Err(format!("cycle through {n}"));
                }
            }
            for &c in self.children(p) {
                if self.parent.get(&c) != Some(&p) {
                    return Err(format!(
                        "{c} listed under {p:?} but its parent is {:?}",
                        self.parent.get(&c)
                    ));
                }
            }
        }
        if seen != self.parent.len() {
            return Err(format!(
                "{} placed nodes, {seen} reachable from the source",
                self.parent.len()
            ));
        }
        Ok(())
    }

    /// Whether the tree is a simple path from the source (each parent feeds at most one).
    pub fn is_chain(&self) -> bool {
        self.children.values().all(|c| c.len() <= 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(n: u32) -> Vec<NodeId> {
        (1..=n).map(NodeId).collect()
    }

    #[test]
    fn arity_one_builds_a_chain_in_order() {
        let t = Topology::build(1, &ids(4));
        assert_eq!(t.children(None), &[NodeId(1)]);
        assert_eq!(t.parent(NodeId(4)), Some(Some(NodeId(3))));
        assert!(t.is_chain());
        t.check().unwrap();
    }

    #[test]
    fn removing_a_middle_node_links_its_neighbours() {
        let mut t = Topology::build(1, &ids(4));
        assert_eq!(t.remove(NodeId(2)), vec![NodeId(3)]);
        assert_eq!(t.parent(NodeId(3)), Some(Some(NodeId(1))));
        assert!(t.is_chain());
        t.check().unwrap();
        // Two adjacent nodes: the survivor links to the nearest live ancestor.
        t.remove(NodeId(1));
        t.remove(NodeId(3));
        assert_eq!(t.parent(NodeId(4)), Some(None));
        t.check().unwrap();
    }

    #[test]
    fn newcomers_go_to_the_tail_of_a_chain() {
        let mut t = Topology::build(1, &ids(3));
        assert_eq!(t.open_slots().next(), Some(Some(NodeId(3))));
        t.attach(NodeId(9), Some(NodeId(3)));
        assert!(t.is_chain());
        t.check().unwrap();
    }

    #[test]
    fn a_relinked_node_keeps_its_subtree_and_the_source_may_exceed_the_arity() {
        let mut t = Topology::build(1, &ids(4));
        t.relink(NodeId(3), None);
        assert_eq!(t.children(None), &[NodeId(1), NodeId(3)]);
        assert_eq!(t.children(Some(NodeId(2))), &[] as &[NodeId]);
        assert_eq!(
            t.parent(NodeId(4)),
            Some(Some(NodeId(3))),
            "3 still feeds 4"
        );
        t.check().unwrap();
        assert!(!t.is_chain(), "the source feeds two");
        // The source is full past its arity: newcomers go to the first node
        // with room, breadth first, never to the source.
        let open: Vec<Parent> = t.open_slots().collect();
        assert_eq!(open, vec![Some(NodeId(2)), Some(NodeId(4))]);
        // Relinking to where it is changes nothing; an unplaced node is ignored.
        t.relink(NodeId(3), None);
        t.relink(NodeId(9), None);
        assert_eq!(t.children(None), &[NodeId(1), NodeId(3)]);
        assert_eq!(t.len(), 4);
        t.check().unwrap();
        // Removing a node the source took in hands its subtree to the source.
        assert_eq!(t.remove(NodeId(3)), vec![NodeId(4)]);
        assert_eq!(t.children(None), &[NodeId(1), NodeId(4)]);
        t.check().unwrap();
    }

    #[test]
    fn trees_fill_breadth_first() {
        let t = Topology::build(2, &ids(6));
        assert_eq!(t.children(None), &[NodeId(1), NodeId(2)]);
        assert_eq!(t.children(Some(NodeId(1))), &[NodeId(3), NodeId(4)]);
        assert_eq!(t.children(Some(NodeId(2))), &[NodeId(5), NodeId(6)]);
        assert_eq!(t.open_slots().next(), Some(Some(NodeId(3))));
        assert_eq!(t.ancestors(NodeId(6)).collect::<Vec<_>>(), vec![NodeId(2)]);
    }
}

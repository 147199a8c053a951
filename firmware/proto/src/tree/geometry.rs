//! Position arithmetic of a breadth-first, left-to-right k-ary tree.
//!
//! Positions start at 1 (the root). With `k` children per node, `parent(p) = (p-2)/k + 1`
//! and the children of `p` are `(p-1)k+2 ..= pk+1`. Routing, failure repair and the choice
//! of the replacement node (always the last position) are all computed from these rules, so
//! no node needs a map of the whole tree.

/// A position in the tree; 1 is the root.
pub type Pos = u64;

/// The parent of `pos`, or `None` for the root (and for the invalid position 0).
pub fn parent_of(pos: Pos, k: u64) -> Option<Pos> {
    if pos <= 1 || k == 0 {
        None
    } else {
        Some((pos - 2) / k + 1)
    }
}

/// The first and last child positions of `pos` (saturating for absurd positions).
pub fn child_range(pos: Pos, k: u64) -> (Pos, Pos) {
    let first = pos.saturating_sub(1).saturating_mul(k).saturating_add(2);
    let last = pos.saturating_mul(k).saturating_add(1);
    (first, last)
}

/// Whether `child` is a direct child position of `pos`.
pub fn is_child(pos: Pos, child: Pos, k: u64) -> bool {
    parent_of(child, k) == Some(pos)
}

/// Depth of `pos`: the root is at depth 0.
pub fn depth_of(mut pos: Pos, k: u64) -> u32 {
    let mut depth = 0;
    while let Some(p) = parent_of(pos, k) {
        pos = p;
        depth += 1;
    }
    depth
}

/// The child of `from` on the path down to `dest`, if `dest` lies strictly below `from`.
pub fn next_hop_down(from: Pos, dest: Pos, k: u64) -> Option<Pos> {
    if dest <= from {
        return None;
    }
    let mut cur = dest;
    loop {
        let parent = parent_of(cur, k)?;
        if parent == from {
            return Some(cur);
        }
        if parent < from {
            return None;
        }
        cur = parent;
    }
}

/// Whether `dest` is `from` itself or lies in the subtree below it.
pub fn in_subtree(from: Pos, dest: Pos, k: u64) -> bool {
    dest == from || next_hop_down(from, dest, k).is_some()
}

/// The depth-1 ancestor of `pos` (the root's child whose subtree holds `pos`).
pub fn root_child_of(pos: Pos, k: u64) -> Option<Pos> {
    next_hop_down(1, pos, k)
}

/// Depth of a complete tree of `size` nodes: the depth of its last position.
pub fn tree_depth(size: u64, k: u64) -> u32 {
    if size == 0 {
        0
    } else {
        depth_of(size, k)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn small_tree_shape() {
        // k = 3: 1 -> 2,3,4; 2 -> 5,6,7; 3 -> 8,9,10
        assert_eq!(parent_of(1, 3), None);
        assert_eq!(parent_of(4, 3), Some(1));
        assert_eq!(parent_of(5, 3), Some(2));
        assert_eq!(parent_of(10, 3), Some(3));
        assert_eq!(child_range(2, 3), (5, 7));
        assert_eq!(depth_of(10, 3), 2);
        assert_eq!(next_hop_down(1, 10, 3), Some(3));
        assert_eq!(next_hop_down(3, 10, 3), Some(10));
        assert_eq!(next_hop_down(2, 10, 3), None);
        assert!(in_subtree(1, 10, 3));
        assert!(!in_subtree(2, 8, 3));
        assert_eq!(root_child_of(29, 3), Some(3));
        assert_eq!(tree_depth(10_000, 10), 4);
    }

    proptest! {
        #[test]
        fn children_and_parent_agree(pos in 1u64..1_000_000, k in 1u64..40) {
            let (first, last) = child_range(pos, k);
            prop_assert_eq!(last - first + 1, k);
            for c in [first, last] {
                prop_assert_eq!(parent_of(c, k), Some(pos));
                prop_assert!(is_child(pos, c, k));
                prop_assert_eq!(depth_of(c, k), depth_of(pos, k) + 1);
            }
        }

        #[test]
        fn next_hop_is_an_ancestor_of_dest(from in 1u64..5_000, dest in 1u64..500_000, k in 2u64..30) {
            if let Some(hop) = next_hop_down(from, dest, k) {
                prop_assert_eq!(parent_of(hop, k), Some(from));
                prop_assert!(in_subtree(hop, dest, k));
            }
        }
    }
}

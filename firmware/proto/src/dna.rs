//! The cell DNA table: every cell type's name, ports and maximum children, compiled in so that
//! every clone of a cell type in the world uses the same ports with no configuration.

/// One cell type's DNA.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CellDna {
    /// Cell type name, e.g. `peerTreeNet`.
    pub name: &'static str,
    /// Port of the cell's own tree (node to node, TLS).
    pub net_port: u16,
    /// Port of the receptor (HTTPS `POST /`), the cell's only door.
    pub recp_port: u16,
    /// Port of the read-only monitor (`GET /status`, `GET /metrics`).
    pub mon_port: u16,
    /// Maximum children per node in this cell's tree (k).
    pub max_children: u32,
}

const fn dna(name: &'static str, net: u16, recp: u16, mon: u16, k: u32) -> CellDna {
    CellDna {
        name,
        net_port: net,
        recp_port: recp,
        mon_port: mon,
        max_children: k,
    }
}

/// All cell types of the network (the base tree first). Which of them this build runs is
/// `borg_cells::REGISTRY`.
pub const CELLS: &[CellDna] = &[
    dna("peerTreeNet", 13300, 13305, 13310, 10),
    dna("shardTree", 13350, 13355, 13340, 25),
    dna("ftreeFileMgr", 13351, 13381, 13341, 3),
    dna("cronoTree", 13396, 13397, 13398, 3),
    dna("peerPays", 13390, 13392, 13391, 25),
    dna("mailTree", 13393, 13395, 13394, 25),
    dna("fStream", 13399, 13400, 13401, 25),
    dna("peerMemory", 13336, 13335, 13339, 25),
    dna("serviceMgr", 13320, 13321, 13322, 10),
    dna("btrader", 11396, 11397, 11398, 3),
    dna("dogeNode", 11390, 11391, 11392, 3),
    dna("borgAgent", 13550, 13552, 13551, 25),
];

/// The base cell every node runs first.
pub const PEER_TREE_NET: CellDna = CELLS[0];
/// Network time.
pub const CRONO_TREE: CellDna = CELLS[3];
/// Shard storage.
pub const SHARD_TREE: CellDna = CELLS[1];
/// File manifests by owner.
pub const FTREE_FILE_MGR: CellDna = CELLS[2];

/// Look a cell type up by name (exact, case-sensitive as in the DNA).
pub fn cell(name: &str) -> Option<&'static CellDna> {
    CELLS.iter().find(|c| c.name == name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn no_two_cells_share_a_port() {
        let mut seen = HashSet::new();
        for c in CELLS {
            for p in [c.net_port, c.recp_port, c.mon_port] {
                assert!(seen.insert(p), "port {p} of {} used twice", c.name);
            }
        }
        assert_eq!(cell("peerTreeNet"), Some(&PEER_TREE_NET));
        assert_eq!(cell("nope"), None);
        assert_eq!(CRONO_TREE.name, "cronoTree");
    }
}

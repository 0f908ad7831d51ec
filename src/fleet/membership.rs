//! The fleet's membership, kept in one item of the table (key
//! `dynacache fleet`, which no client can name): a list of members, each an
//! id and the address its peers dial. Read by every member every
//! `membership_period` (one strongly consistent GetItem); written, with a
//! condition on the version read, only when a member joins, leaves or is
//! evicted.

use serde::{Deserialize, Serialize};

use crate::store::{Change, Expect, Item, Store, StoreError, View, Written};

/// The membership item's key.
pub const KEY: &[u8] = b"dynacache fleet";

/// One member of the fleet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// Random, new at every start of a sidecar.
    pub id: u64,
    /// Where its peers connect (`host:port`).
    pub addr: String,
}

/// The membership as read, with the item's version (for the next
/// conditional write).
#[derive(Debug, Clone, Default)]
pub struct Roster {
    pub members: Vec<Member>,
    item: Option<Item>,
}

impl Roster {
    pub fn contains(&self, id: u64) -> bool {
        self.members.iter().any(|m| m.id == id)
    }
}

/// Reads the membership (strongly consistent).
pub async fn read<S: Store>(store: &S) -> Result<Roster, StoreError> {
    let item = store.get(KEY).await?;
    let members = match &item {
        Some(item) if !item.value.is_empty() => postcard::from_bytes(&item.value)
            .map_err(|_| StoreError::BadItem("the fleet's membership item".into()))?,
        _ => Vec::new(),
    };
    Ok(Roster { members, item })
}

/// Changes the membership with `change`, retrying from what a failed
/// condition returns. Returns the membership as written.
pub async fn update<S: Store>(
    store: &S,
    mut change: impl FnMut(&mut Vec<Member>),
) -> Result<Roster, StoreError> {
    let mut roster = read(store).await?;
    for _ in 0..32 {
        let mut members = roster.members.clone();
        change(&mut members);
        if members == roster.members {
            return Ok(roster);
        }
        let version = roster.item.as_ref().map_or(0, |i| i.version) + 1;
        let item = Item {
            value: postcard::to_stdvec(&members).expect("members encode"),
            flags: 0,
            expires_at: 0,
            version,
            chunks: 0,
        };
        let expect = Expect::of(roster.item.as_ref(), View::default());
        match store
            .write(KEY, Change::Put(&item), expect, View::default())
            .await?
        {
            Written::Done { .. } => {
                return Ok(Roster {
                    members,
                    item: Some(item),
                });
            }
            Written::Conflict(current) => {
                let members = match &current {
                    Some(item) if !item.value.is_empty() => postcard::from_bytes(&item.value)
                        .map_err(|_| StoreError::BadItem("the fleet's membership item".into()))?,
                    _ => Vec::new(),
                };
                roster = Roster {
                    members,
                    item: current,
                };
            }
        }
    }
    Err(StoreError::Contention)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;

    #[tokio::test]
    async fn join_leave_and_racing_updates() {
        let store = MemoryStore::new();
        assert!(read(&store).await.unwrap().members.is_empty());
        let me = Member {
            id: 1,
            addr: "127.0.0.1:1".into(),
        };
        let roster = update(&store, |m| m.push(me.clone())).await.unwrap();
        assert!(roster.contains(1));
        // Another member joined meanwhile: the update retries on its version.
        let other = Member {
            id: 2,
            addr: "127.0.0.1:2".into(),
        };
        let mut item = store.raw(KEY).unwrap();
        item.value = postcard::to_stdvec(&vec![me.clone(), other.clone()]).unwrap();
        item.version += 1;
        store.insert_raw(KEY, item);
        let third = Member {
            id: 3,
            addr: "127.0.0.1:3".into(),
        };
        let roster = update(&store, |m| m.push(third.clone())).await.unwrap();
        assert_eq!(roster.members, vec![me, other, third]);
        let roster = update(&store, |m| m.retain(|m| m.id != 2)).await.unwrap();
        assert!(!roster.contains(2) && roster.contains(1) && roster.contains(3));
        assert_eq!(read(&store).await.unwrap().members, roster.members);
    }
}

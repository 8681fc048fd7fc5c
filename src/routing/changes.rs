//! What a reload changes, said in the file's own terms: routes by the name
//! clients call them by, event rules by topic, composed routes by name.
//! The log line of a reload and its tests read this, not the tables.

use std::collections::BTreeMap;
use std::fmt;

use super::RouteTable;

/// The entries one routing table adds, removes and changes against
/// another, each named as `route me.profile`, `event orders.#` or
/// `compose home.load`, sorted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TableChanges {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub changed: Vec<String>,
}

impl TableChanges {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.changed.is_empty()
    }
}

impl fmt::Display for TableChanges {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return f.write_str("no change");
        }
        let mut first = true;
        for (what, names) in [
            ("added", &self.added),
            ("removed", &self.removed),
            ("changed", &self.changed),
        ] {
            if names.is_empty() {
                continue;
            }
            if !first {
                f.write_str("; ")?;
            }
            first = false;
            write!(f, "{what}: {}", names.join(", "))?;
        }
        Ok(())
    }
}

/// Every entry of a table under its name, with what it says (several
/// entries may share a name: event rules with one topic).
fn entries(table: &RouteTable) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for r in &table.routes {
        let name = format!(
            "route {}.{}",
            r.exposed_service,
            r.exposed_method.as_deref().unwrap_or("*")
        );
        out.entry(name).or_default().push(format!("{r:?}"));
    }
    for e in &table.events {
        out.entry(format!("event {}", e.pattern))
            .or_default()
            .push(format!("{e:?}"));
    }
    for c in &table.composed {
        out.entry(format!("compose {}.{}", c.service, c.method))
            .or_default()
            .push(format!("{c:?}"));
    }
    out
}

impl RouteTable {
    /// What `new` adds, removes and changes against this table.
    pub fn changes_to(&self, new: &RouteTable) -> TableChanges {
        let (old, new) = (entries(self), entries(new));
        let mut changes = TableChanges::default();
        for (name, says) in &new {
            match old.get(name) {
                None => changes.added.push(name.clone()),
                Some(before) if before != says => changes.changed.push(name.clone()),
                Some(_) => {}
            }
        }
        changes.removed = old
            .keys()
            .filter(|name| !new.contains_key(*name))
            .cloned()
            .collect();
        changes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn table(text: &str) -> RouteTable {
        RouteTable::parse("routes.toml", text).unwrap()
    }

    #[test]
    fn names_what_was_added_removed_and_changed() {
        let old = table(
            "[[route]]\ncall = \"orders.*\"\n\n[[route]]\ncall = \"users.get\"\nroles = [\"a\"]\n\n\
             [[event]]\ntopic = \"orders.#\"\n",
        );
        let new = table(
            "[[route]]\ncall = \"users.get\"\nroles = [\"b\"]\n\n[[route]]\ncall = \"search.query\"\n\n\
             [[event]]\ntopic = \"orders.#\"\n\n[[compose]]\nname = \"home.load\"\n\
             [[compose.part]]\nkey = \"u\"\ncall = \"users.get\"\n",
        );
        let c = old.changes_to(&new);
        assert_eq!(c.added, vec!["compose home.load", "route search.query"]);
        assert_eq!(c.removed, vec!["route orders.*"]);
        assert_eq!(c.changed, vec!["route users.get"]);
        assert_eq!(
            c.to_string(),
            "added: compose home.load, route search.query; removed: route orders.*; changed: route users.get"
        );
        assert!(new.changes_to(&new).is_empty());
        assert_eq!(new.changes_to(&new).to_string(), "no change");
    }

    #[test]
    fn a_new_default_timeout_changes_the_routes_that_use_it() {
        let old =
            table("[[route]]\ncall = \"a.b\"\n\n[[route]]\ncall = \"c.d\"\ntimeout_ms = 100\n");
        let new = table(
            "[defaults]\ntimeout_ms = 5000\n\n[[route]]\ncall = \"a.b\"\n\n[[route]]\ncall = \"c.d\"\ntimeout_ms = 100\n",
        );
        assert_eq!(old.changes_to(&new).changed, vec!["route a.b"]);
    }

    /// Tables of a few routes drawn from a small set of calls and roles.
    fn arb_table() -> impl Strategy<Value = RouteTable> {
        proptest::collection::btree_map("[a-c]\\.[x-z]", proptest::option::of("[pq]"), 0..6)
            .prop_map(|routes| {
                let text: String = routes
                    .iter()
                    .map(|(call, role)| match role {
                        Some(r) => format!("[[route]]\ncall = \"{call}\"\nroles = [\"{r}\"]\n\n"),
                        None => format!("[[route]]\ncall = \"{call}\"\n\n"),
                    })
                    .collect();
                table(&text)
            })
    }

    proptest! {
        /// Going back undoes going forth: what one way adds the other
        /// removes, and what changed changed both ways.
        #[test]
        fn changes_are_symmetric(a in arb_table(), b in arb_table()) {
            let forth = a.changes_to(&b);
            let back = b.changes_to(&a);
            prop_assert_eq!(&forth.added, &back.removed);
            prop_assert_eq!(&forth.removed, &back.added);
            prop_assert_eq!(&forth.changed, &back.changed);
            prop_assert_eq!(forth.is_empty(), a.changes_to(&b).is_empty());
            prop_assert!(a.changes_to(&a).is_empty());
        }
    }
}

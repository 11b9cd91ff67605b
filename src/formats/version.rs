//! The one error every reader gives for a format version it cannot read.

/// A format version this build cannot read.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}", self.message())]
pub struct VersionError {
    /// What the file is, e.g. "vmm snapshot file".
    pub name: &'static str,
    /// The version found.
    pub found: u32,
    /// The oldest version this build reads.
    pub oldest: u32,
    /// The newest version this build reads (= the one it writes).
    pub newest: u32,
}

impl VersionError {
    fn message(&self) -> String {
        let range = if self.oldest == self.newest {
            format!("version {}", self.newest)
        } else {
            format!("versions {} to {}", self.oldest, self.newest)
        };
        if self.found > self.newest {
            format!(
                "{} has format version {}, but this vmm ({}) reads {range}: it needs a newer \
                 vmm, one that reads version {}",
                self.name,
                self.found,
                env!("CARGO_PKG_VERSION"),
                self.found
            )
        } else {
            format!(
                "{} has format version {}, older than this vmm ({}) reads ({range})",
                self.name,
                self.found,
                env!("CARGO_PKG_VERSION")
            )
        }
    }
}

/// `Ok` if `found` is in `oldest..=newest`, else the error naming what is needed.
pub fn check_version(
    name: &'static str,
    found: u32,
    oldest: u32,
    newest: u32,
) -> Result<(), VersionError> {
    if (oldest..=newest).contains(&found) {
        Ok(())
    } else {
        Err(VersionError {
            name,
            found,
            oldest,
            newest,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_say_what_is_needed() {
        let newer = check_version("vmm snapshot file", 4, 2, 3).unwrap_err();
        assert_eq!(
            newer.to_string(),
            format!(
                "vmm snapshot file has format version 4, but this vmm ({}) reads versions 2 \
                 to 3: it needs a newer vmm, one that reads version 4",
                env!("CARGO_PKG_VERSION")
            )
        );
        let one = check_version("chunk file", 2, 1, 1)
            .unwrap_err()
            .to_string();
        assert!(
            one.contains("reads version 1: it needs a newer vmm"),
            "{one}"
        );
        let older = check_version("x", 1, 2, 3).unwrap_err().to_string();
        assert!(older.contains("older than this vmm"), "{older}");
        assert!(check_version("x", 3, 2, 3).is_ok());
    }
}

//! The shared libraries a program needs at run time, to copy them into the
//! image next to it.
//!
//! The ELF file names its interpreter (the dynamic loader) and its direct
//! `DT_NEEDED` libraries; where each one is found, and what those need in
//! turn, is the loader's business (`ld.so.cache`, `RUNPATH`, multiarch
//! directories). So the loader itself is asked, in its list mode
//! (`ld-linux-x86-64.so.2 --list PROGRAM`, what `ldd` does), which runs none
//! of the program's code; every library the ELF file names must show up
//! resolved in that list.

use std::path::{Path, PathBuf};
use std::process::Command;

/// What a program needs besides itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Needs {
    /// The dynamic loader (`PT_INTERP`), `None` for a static program.
    pub interpreter: Option<PathBuf>,
    /// Every shared library, resolved to an absolute path, dependencies included.
    pub libraries: Vec<PathBuf>,
}

/// What the ELF header of a program says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ElfDeps {
    /// `PT_INTERP`.
    pub interpreter: Option<String>,
    /// `DT_NEEDED` names.
    pub needed: Vec<String>,
}

/// Reads the interpreter and `DT_NEEDED` entries of the ELF file `bytes`.
pub fn elf_deps(bytes: &[u8]) -> Result<ElfDeps, String> {
    let elf = goblin::elf::Elf::parse(bytes).map_err(|e| format!("not an ELF program: {e}"))?;
    Ok(ElfDeps {
        interpreter: elf.interpreter.map(str::to_string),
        needed: elf.libraries.iter().map(|s| s.to_string()).collect(),
    })
}

/// Finds everything `program` needs to run on a machine that has nothing
/// else: its loader and all shared libraries, resolved by that loader.
pub fn needs(program: &Path) -> Result<Needs, String> {
    let bytes =
        std::fs::read(program).map_err(|e| format!("cannot read {}: {e}", program.display()))?;
    let deps = elf_deps(&bytes).map_err(|e| format!("{}: {e}", program.display()))?;
    let Some(interp) = deps.interpreter else {
        if deps.needed.is_empty() {
            return Ok(Needs {
                interpreter: None,
                libraries: Vec::new(),
            });
        }
        return Err(format!(
            "{} needs shared libraries but names no loader",
            program.display()
        ));
    };
    let out = Command::new(&interp)
        .arg("--list")
        .arg(program)
        .output()
        .map_err(|e| {
            format!(
                "cannot run {}'s loader {interp} to list its libraries: {e}",
                program.display()
            )
        })?;
    if !out.status.success() {
        return Err(format!(
            "{interp} --list {} failed: {}",
            program.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let listed = parse_loader_list(&String::from_utf8_lossy(&out.stdout))?;
    for name in &deps.needed {
        let found = listed
            .iter()
            .any(|p| p.file_name().and_then(|f| f.to_str()) == Some(name.as_str()));
        if !found {
            return Err(format!(
                "{} needs {name}, which its loader did not resolve",
                program.display()
            ));
        }
    }
    let interpreter = PathBuf::from(&interp);
    let libraries = listed.into_iter().filter(|p| *p != interpreter).collect();
    Ok(Needs {
        interpreter: Some(interpreter),
        libraries,
    })
}

/// Parses the loader's list mode output:
///
/// ```text
///     linux-vdso.so.1 (0x00007ffc…)
///     libgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x…)
///     /lib64/ld-linux-x86-64.so.2 (0x…)
/// ```
///
/// The vDSO lives in the kernel, not in a file. A library the loader could
/// not find (`=> not found`) is an error naming it.
pub fn parse_loader_list(text: &str) -> Result<Vec<PathBuf>, String> {
    let mut out = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let target = match line.split_once("=>") {
            Some((name, rest)) => {
                let rest = rest.trim();
                if rest.starts_with("not found") {
                    return Err(format!("shared library {} not found", name.trim()));
                }
                rest
            }
            None => line,
        };
        let path = target.split(" (").next().unwrap_or("").trim();
        if path.starts_with('/') {
            out.push(PathBuf::from(path));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loader_list_is_parsed_without_the_vdso() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd2f5f2000)\n\
                    \tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f1c98be0000)\n\
                    \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f1c9891e000)\n\
                    \t/lib64/ld-linux-x86-64.so.2 (0x00007f1c990ea000)\n";
        assert_eq!(
            parse_loader_list(text).unwrap(),
            [
                "/lib/x86_64-linux-gnu/libgcc_s.so.1",
                "/lib/x86_64-linux-gnu/libc.so.6",
                "/lib64/ld-linux-x86-64.so.2"
            ]
            .map(PathBuf::from)
        );
        let err = parse_loader_list("\tlibfoo.so.3 => not found\n").unwrap_err();
        assert!(err.contains("libfoo.so.3"), "{err}");
    }

    #[test]
    fn the_test_binary_needs_libc_and_its_loader() {
        let exe = std::env::current_exe().unwrap();
        let needs = needs(&exe).unwrap();
        let interp = needs
            .interpreter
            .clone()
            .expect("a dynamically linked test binary");
        assert!(interp.is_file(), "{}", interp.display());
        assert!(
            needs.libraries.iter().any(|l| l
                .file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("libc.so")),
            "{needs:?}"
        );
        assert!(needs
            .libraries
            .iter()
            .all(|l| l.is_absolute() && l.exists()));
        assert!(!needs.libraries.contains(&interp));
    }

    #[test]
    fn a_non_elf_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("script");
        std::fs::write(&f, "#!/bin/sh\n").unwrap();
        assert!(needs(&f).unwrap_err().contains("not an ELF program"));
    }
}

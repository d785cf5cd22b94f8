//! Running host tools: one place that turns a failed command into an error naming it.

use std::process::{Command, Output};

use anyhow::{bail, Context, Result};

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs `cmd`, capturing its output; fails with its stderr when it exits non-zero.
pub fn output(cmd: &mut Command) -> Result<Output> {
    let what = describe(cmd);
    let out = cmd
        .output()
        .with_context(|| format!("failed to start `{what}`"))?;
    if !out.status.success() {
        bail!(
            "`{what}` failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out)
}

/// Runs `cmd` and returns its stdout as text.
pub fn stdout(cmd: &mut Command) -> Result<String> {
    Ok(String::from_utf8_lossy(&output(cmd)?.stdout).into_owned())
}

/// Runs `cmd` with its output passed through (for long steps such as cargo).
pub fn status(cmd: &mut Command) -> Result<()> {
    let what = describe(cmd);
    let st = cmd
        .status()
        .with_context(|| format!("failed to start `{what}`"))?;
    if !st.success() {
        bail!("`{what}` failed ({st})");
    }
    Ok(())
}

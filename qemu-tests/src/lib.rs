//! The harness: one disposable virtual machine per test.

//! Test harness: an in-process proxy, mock backends, and a fixture that runs one test body on each data path.

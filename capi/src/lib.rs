//! C ABI for qcow2rs.

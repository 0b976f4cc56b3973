//! backing

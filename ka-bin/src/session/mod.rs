//! Sessions as a library: serving an image, joining a session, and what a
//! node does to its verified copy ([`identity`]).

pub mod identity;

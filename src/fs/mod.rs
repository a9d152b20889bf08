//! The union tree of a layer stack, the FUSE adapter and mount/umount.
//! (FS helper: implement.)

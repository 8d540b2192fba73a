//! QEMU: the QMP client, live backup of running VMs through external snapshots, and
//! finding the running VM of a volume.

pub mod discover;
pub mod live;
pub mod nbd;
pub mod qmp;
pub mod stream;

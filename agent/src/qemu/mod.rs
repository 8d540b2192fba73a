//! QEMU: the QMP client and live backup of running VMs through external snapshots.

pub mod live;
pub mod nbd;
pub mod qmp;

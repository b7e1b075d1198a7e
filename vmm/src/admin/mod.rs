//! What a site runs beside the VMs, not in them: the host report (`hpcvm doctor`:
//! KVM, hugepages, IOMMU, passthrough devices, memlock, virtiofsd) and SR-IOV set-up
//! (`hpcvm sriov`: create virtual functions, set InfiniBand GUIDs, bind to vfio-pci).

pub mod doctor;
pub mod sriov;

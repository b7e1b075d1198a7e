//! What the kernel is told about the machine: PVH `hvm_start_info` or Linux `boot_params`.

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use vm_memory::{GuestAddress, GuestMemoryMmap};

use super::{BootError, BootImage, Protocol};
use crate::memory::layout::{
    memory_map, CMDLINE_START, PVH_INFO_START, PVH_MEMMAP_START, PVH_MODLIST_START, ZERO_PAGE_START,
};

const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;
const E820_MAX_ENTRIES: usize = 128;

/// Writes the boot information structure for `image`'s protocol into `mem`.
pub fn write(image: &BootImage, mem: &GuestMemoryMmap, ram_size: u64) -> Result<(), BootError> {
    let map = memory_map(ram_size);
    let res = match image.protocol {
        Protocol::Pvh => write_pvh(image, mem, &map),
        Protocol::Linux64 => write_zero_page(image, mem, &map),
    };
    res.map_err(|e| BootError::GuestWrite {
        what: "boot parameters",
        detail: e.to_string(),
    })
}

fn write_pvh(
    image: &BootImage,
    mem: &GuestMemoryMmap,
    map: &[(u64, u64, u32)],
) -> Result<(), linux_loader::configurator::Error> {
    let memmap: Vec<hvm_memmap_table_entry> = map
        .iter()
        .map(|&(addr, size, type_)| hvm_memmap_table_entry {
            addr,
            size,
            type_,
            reserved: 0,
        })
        .collect();
    let modules: Vec<hvm_modlist_entry> = image
        .initramfs
        .iter()
        .map(|&(paddr, size)| hvm_modlist_entry {
            paddr,
            size,
            ..Default::default()
        })
        .collect();
    let info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: memmap.len() as u32,
        nr_modules: modules.len() as u32,
        modlist_paddr: if modules.is_empty() {
            0
        } else {
            PVH_MODLIST_START
        },
        ..Default::default()
    };
    let mut params = BootParams::new(&info, GuestAddress(PVH_INFO_START));
    params.set_sections(&memmap, GuestAddress(PVH_MEMMAP_START));
    if !modules.is_empty() {
        params.set_modules(&modules, GuestAddress(PVH_MODLIST_START));
    }
    PvhBootConfigurator::write_bootparams::<GuestMemoryMmap>(&params, mem)
}

fn write_zero_page(
    image: &BootImage,
    mem: &GuestMemoryMmap,
    map: &[(u64, u64, u32)],
) -> Result<(), linux_loader::configurator::Error> {
    let mut bp = boot_params::default();
    if let Some(hdr) = image.setup_header {
        bp.hdr = hdr;
    } else {
        bp.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
        bp.hdr.header = KERNEL_HDR_MAGIC;
        bp.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
    }
    bp.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    bp.hdr.cmd_line_ptr = CMDLINE_START as u32;
    bp.hdr.cmdline_size = image.cmdline_len as u32;
    if let Some((addr, size)) = image.initramfs {
        bp.hdr.ramdisk_image = addr as u32;
        bp.hdr.ramdisk_size = size as u32;
        bp.ext_ramdisk_image = (addr >> 32) as u32;
        bp.ext_ramdisk_size = (size >> 32) as u32;
    }
    for (i, &(addr, size, type_)) in map.iter().take(E820_MAX_ENTRIES).enumerate() {
        bp.e820_table[i] = boot_e820_entry {
            addr,
            size,
            r#type: type_,
        };
        bp.e820_entries = (i + 1) as u8;
    }
    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(
        &BootParams::new(&bp, GuestAddress(ZERO_PAGE_START)),
        mem,
    )
}

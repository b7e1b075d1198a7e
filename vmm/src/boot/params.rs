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
use crate::acpi::RSDP_START;
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
        rsdp_paddr: RSDP_START,
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
    bp.acpi_rsdp_addr = RSDP_START;
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

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap()
    }

    fn image(protocol: Protocol, initramfs: Option<(u64, u64)>) -> BootImage {
        BootImage {
            protocol,
            entry: 0x100000,
            kernel_end: 0x200000,
            setup_header: None,
            initramfs,
            cmdline_len: 31,
        }
    }

    #[test]
    fn zero_page_has_loader_cmdline_initramfs_and_e820() {
        let m = mem();
        write(
            &image(Protocol::Linux64, Some((0x3ff_f000, 0x1234))),
            &m,
            64 << 20,
        )
        .unwrap();
        let bp: boot_params = m.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        let hdr = bp.hdr;
        assert_eq!({ hdr.boot_flag }, KERNEL_BOOT_FLAG_MAGIC);
        assert_eq!({ hdr.header }, KERNEL_HDR_MAGIC);
        assert_eq!({ hdr.type_of_loader }, KERNEL_LOADER_OTHER);
        assert_eq!({ hdr.cmd_line_ptr }, CMDLINE_START as u32);
        assert_eq!({ hdr.cmdline_size }, 31);
        assert_eq!(
            ({ hdr.ramdisk_image }, { hdr.ramdisk_size }),
            (0x3ff_f000, 0x1234)
        );
        assert_eq!(bp.e820_entries, 3);
        assert_eq!({ bp.acpi_rsdp_addr }, RSDP_START);
        let e: Vec<(u64, u64, u32)> = bp.e820_table[..3]
            .iter()
            .map(|x| ({ x.addr }, { x.size }, { x.r#type }))
            .collect();
        assert_eq!(e, memory_map(64 << 20));
    }

    #[test]
    fn pvh_start_info_points_at_memmap_cmdline_and_module() {
        let m = mem();
        write(
            &image(Protocol::Pvh, Some((0x0300_0000, 777))),
            &m,
            64 << 20,
        )
        .unwrap();
        let si: hvm_start_info = m.read_obj(GuestAddress(PVH_INFO_START)).unwrap();
        assert_eq!(si.magic, XEN_HVM_START_MAGIC);
        assert_eq!(si.cmdline_paddr, CMDLINE_START);
        assert_eq!((si.nr_modules, si.modlist_paddr), (1, PVH_MODLIST_START));
        assert_eq!(si.memmap_entries, 3);
        assert_eq!(si.rsdp_paddr, RSDP_START);
        let module: hvm_modlist_entry = m.read_obj(GuestAddress(PVH_MODLIST_START)).unwrap();
        assert_eq!((module.paddr, module.size), (0x0300_0000, 777));
        let last: hvm_memmap_table_entry =
            m.read_obj(GuestAddress(PVH_MEMMAP_START + 2 * 24)).unwrap();
        assert_eq!(
            (last.addr, last.size, last.type_),
            (0x100000, (64 << 20) - 0x100000, 1)
        );
    }

    #[test]
    fn pvh_without_initramfs_lists_no_module() {
        let m = mem();
        write(&image(Protocol::Pvh, None), &m, 64 << 20).unwrap();
        let si: hvm_start_info = m.read_obj(GuestAddress(PVH_INFO_START)).unwrap();
        assert_eq!((si.nr_modules, si.modlist_paddr), (0, 0));
    }
}

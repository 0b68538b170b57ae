//! Entry points, the CPL0 code and the descriptor tables.
//!
//! Everything that runs at CPL0 is in the `global_asm!` below, so the compiler cannot put SSE or
//! other instructions there that an instruction-by-instruction CPL0 emulator (PVM "native" mode)
//! may not handle. Measured on this host (see the crate README): the CPL0 code must not use the
//! stack for `call`/`push` (both faulted under PVM's emulator); plain `mov` stores, `lgdt`, `ltr`,
//! `lidt`, `mov` to control registers and `iretq` work. Exceptions raised in ring 3 are delivered
//! through the guest IDT onto the TSS RSP0 stack; `int n` from ring 3 is not (it triple-faults),
//! so there is no software-interrupt "syscall": ring 3 does port I/O itself, allowed by the TSS
//! I/O permission bitmap (architectural, so also valid on VMX, SVM and TCG).
//!
//! Device interrupts: vectors 32..47 have stubs that count the delivery (`incq`), write the
//! LAPIC EOI register and IRETQ (6 instructions; vector 47, the spurious vector, skips the EOI).
//! Ring 3 cannot `sti`, so it sets RFLAGS.IF through a #UD gate: `ud2` at `tg_if_gate` makes the
//! #UD stub set IF in the IRETQ frame from RDI and resume after it. Measured on this host: unlike
//! IOPL, the IF from the guest's IRETQ frame is honoured in ring 3 (IF=1: interrupts arrive;
//! IF=0: they wait in the LAPIC IRR), although `pushfq` in ring 3 always reads IF=1 there.
//!
//! Flow: `_start` (64-bit Linux boot protocol, RSI = zero page) or `tg_pvh_entry` (32-bit PVH,
//! EBX = `hvm_start_info`, enables long mode itself) -> `tg_long_common` (GDT, TSS, IDT, page
//! tables, CR0/CR4 for SSE) -> IRETQ to `tg_user_entry` at CPL3, which zeroes .bss and calls
//! [`crate::tg_main`].

use core::arch::global_asm;

/// Boot protocol the guest was entered through, as recorded by the entry code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// 64-bit Linux boot protocol; the boot info is the zero page (`struct boot_params`).
    Linux64,
    /// PVH; the boot info is `struct hvm_start_info`.
    Pvh,
}

/// What the exception stubs record before they IRETQ to the ring-3 reporter.
#[derive(Debug, Clone, Copy)]
pub struct FaultInfo {
    /// Exception vector.
    pub vector: u64,
    /// Faulting RIP from the exception frame.
    pub rip: u64,
    /// Error code (0 for vectors without one).
    pub err: u64,
    /// CR2 at the time of the exception (meaningful for #PF).
    pub cr2: u64,
}

extern "C" {
    static tg_boot_protocol: u64;
    static tg_boot_info_ptr: u64;
    static tg_fault_vector: u64;
    static tg_fault_rip: u64;
    static tg_fault_err: u64;
    static tg_fault_cr2: u64;
    static tg_idt: u8;
    static tg_irq_counts: [u64; IRQ_VECTORS];
    static __image_start: u8;
    static __image_end: u8;
    static tg_pd_pool: u8;
    static tg_pdpt: u8;
}

/// Number of 4 KiB page directories reserved in .bss for mapping RAM above 4 GiB.
pub const PD_POOL_LEN: usize = 60;

/// First vector of the device interrupt stubs (below are the 32 exception vectors).
pub const IRQ_VECTOR_BASE: u8 = 32;
/// Number of device interrupt vectors with a counting stub: `IRQ_VECTOR_BASE..IRQ_VECTOR_BASE + 16`.
pub const IRQ_VECTORS: usize = 16;
/// The vector the LAPIC's spurious-interrupt register names: its stub counts but sends no EOI
/// (Intel SDM Vol. 3A, 11.9). The low four bits are all ones, as P6-era APICs require.
pub const SPURIOUS_VECTOR: u8 = IRQ_VECTOR_BASE + 15;
/// Number of IDT gates (exceptions and device interrupts); other vectors raise #GP.
pub const IDT_VECTORS: usize = 32 + IRQ_VECTORS;

extern "C" {
    /// Ring 3: sets RFLAGS.IF to `enable & 1` through the #UD gate (see the asm below).
    fn tg_set_if(enable: u64);
}

fn read_u64_static(p: *const u64) -> u64 {
    // SAFETY: `p` points at an 8-byte aligned `.quad` defined in the global_asm below; it is
    // written only by CPL0 code that has finished (entry) or is not running (fault stubs run with
    // ring 3 stopped), so a volatile read sees a complete value.
    unsafe { core::ptr::read_volatile(p) }
}

/// The protocol recorded by the entry code.
pub fn protocol() -> Protocol {
    // `addr_of!` on an extern static only takes its address; nothing is read here.
    if read_u64_static(core::ptr::addr_of!(tg_boot_protocol)) == 1 {
        Protocol::Pvh
    } else {
        Protocol::Linux64
    }
}

/// Physical address of the zero page (Linux64) or `hvm_start_info` (PVH).
pub fn boot_info_ptr() -> u64 {
    read_u64_static(core::ptr::addr_of!(tg_boot_info_ptr))
}

/// The values the exception stubs saved.
pub fn fault_info() -> FaultInfo {
    FaultInfo {
        vector: read_u64_static(core::ptr::addr_of!(tg_fault_vector)),
        rip: read_u64_static(core::ptr::addr_of!(tg_fault_rip)),
        err: read_u64_static(core::ptr::addr_of!(tg_fault_err)),
        cr2: read_u64_static(core::ptr::addr_of!(tg_fault_cr2)),
    }
}

/// Physical range `[start, end)` occupied by the guest image, including .bss (stacks, tables).
pub fn image_range() -> (u64, u64) {
    let start = core::ptr::addr_of!(__image_start) as u64;
    let end = core::ptr::addr_of!(__image_end) as u64;
    (start, end)
}

/// Deliveries counted by the stub of `vector` so far (0 for vectors without a counting stub).
pub fn irq_count(vector: u8) -> u64 {
    let Some(i) = vector.checked_sub(IRQ_VECTOR_BASE).map(usize::from) else {
        return 0;
    };
    if i >= IRQ_VECTORS {
        return 0;
    }
    let base = core::ptr::addr_of!(tg_irq_counts).cast::<u64>();
    // SAFETY: `i < IRQ_VECTORS`, so the pointer stays inside the 8-byte aligned array defined in
    // the global_asm below; the CPL0 stubs update it with one `incq` while ring 3 is interrupted,
    // so a volatile read sees a complete value.
    read_u64_static(unsafe { base.add(i) })
}

/// Enables or disables interrupt delivery to ring 3 (RFLAGS.IF). Ring 3 cannot execute `sti`
/// (IOPL is 0), so this raises #UD at a known address; the #UD stub sees that address, sets IF
/// in the IRETQ frame as asked and resumes after the `ud2`.
pub fn set_interrupts(enable: bool) {
    // SAFETY: `tg_set_if` is the two-instruction ring-3 routine below (`ud2; ret`), following
    // the C ABI; the CPL0 gate only changes RFLAGS.IF and RIP in the return frame.
    unsafe { tg_set_if(u64::from(enable)) }
}

/// RFLAGS as ring 3 reads it with `pushfq` (on some hosts IF here is the host's view).
pub fn read_rflags() -> u64 {
    let flags: u64;
    // SAFETY: pushfq/pop touch only the stack slot they use; no other memory or flags change.
    unsafe { core::arch::asm!("pushfq", "pop {}", out(reg) flags, options(preserves_flags)) };
    flags
}

/// Physical address of the IDT (ring 3 zeroes it to force a triple fault).
pub fn idt_addr() -> u64 {
    core::ptr::addr_of!(tg_idt) as u64
}

/// Physical address of the page-directory-pointer table covering the first 512 GiB.
pub fn pdpt_addr() -> u64 {
    core::ptr::addr_of!(tg_pdpt) as u64
}

/// Physical address of the pool of [`PD_POOL_LEN`] zeroed page directories.
pub fn pd_pool_addr() -> u64 {
    core::ptr::addr_of!(tg_pd_pool) as u64
}

// Selectors of the GDT below.
//   0x08 kernel code (64-bit), 0x10 kernel data, 0x1b user code (64-bit, RPL 3),
//   0x23 user data (RPL 3), 0x28 TSS (16-byte system descriptor).
global_asm!(
    r#"
    .set KERNEL_CS, 0x08
    .set KERNEL_DS, 0x10
    .set USER_CS, 0x1b
    .set USER_DS, 0x23
    .set TSS_SEL, 0x28
    .set MSR_EFER, 0xc0000080
    .set EFER_LME, 0x100
    .set CR0_PE, 0x1
    .set CR0_MP, 0x2
    .set CR0_EM, 0x4
    .set CR0_NE, 0x20
    .set CR0_PG, 0x80000000
    .set CR4_PAE, 0x20
    .set CR4_OSFXSR, 0x200
    .set CR4_OSXMMEXCPT, 0x400
    .set NUM_VECTORS, {idt_vectors}
    .set IRQ_BASE, {irq_base}
    .set SPURIOUS, {spurious}
    .set RFLAGS_IF, 0x200
    .set LAPIC_EOI, 0xfee000b0             /* LAPIC EOI register (SDM Vol. 3A, 11.8.5) */

    /* PVH ELF note: name "Xen", type XEN_ELFNOTE_PHYS32_ENTRY (18), desc = 32-bit entry. */
    .section .note.Xen, "a", @note
    .balign 4
    .long 4
    .long 4
    .long 18
    .asciz "Xen"
    .balign 4
    .long tg_pvh_entry
    .balign 4

    .section .text._start, "ax"

    /* 64-bit Linux boot protocol entry: long mode, paging on (first GiB identity), RSI = zero
       page, interrupts off. */
    .code64
    .globl _start
_start:
    movq %rsi, tg_boot_info_ptr(%rip)      /* remember the zero page */
    movq $0, tg_boot_protocol(%rip)        /* 0 = Linux64 */
    jmp tg_long_common

    /* PVH entry: 32-bit protected mode, paging off, flat segments, EBX = hvm_start_info. */
    .code32
    .globl tg_pvh_entry
tg_pvh_entry:
    movl %ebx, tg_boot_info_ptr            /* low half of the start_info address */
    movl $0, tg_boot_info_ptr + 4          /* high half */
    movl $1, tg_boot_protocol              /* 1 = PVH */
    lgdt tg_gdt_ptr                        /* our GDT (the 32-bit base half is what loads) */
    movl %cr4, %eax
    orl $CR4_PAE, %eax                     /* long mode needs PAE paging */
    movl %eax, %cr4
    movl $tg_pml4, %eax
    movl %eax, %cr3                        /* our identity map (below 4 GiB) */
    movl $MSR_EFER, %ecx
    rdmsr
    orl $EFER_LME, %eax                    /* request long mode */
    wrmsr
    movl %cr0, %eax
    orl $(CR0_PG | CR0_PE), %eax           /* paging on: long mode becomes active */
    movl %eax, %cr0
    ljmp $KERNEL_CS, $tg_long_common       /* far jump into the 64-bit code segment */

    /* Common 64-bit setup, at CPL0. Only mov stores, no stack use. */
    .code64
tg_long_common:
    lgdt tg_gdt_ptr(%rip)                  /* GDT with kernel/user segments and the TSS */
    movl $KERNEL_DS, %eax
    movl %eax, %ds                         /* flat data segments */
    movl %eax, %es
    movl %eax, %ss
    movl %eax, %fs
    movl %eax, %gs
    leaq tg_tss(%rip), %rax                /* patch the TSS base into its descriptor: */
    movw %ax, tg_gdt + 0x2a(%rip)          /*   base 15:0 */
    shrq $16, %rax
    movb %al, tg_gdt + 0x2c(%rip)          /*   base 23:16 */
    movb %ah, tg_gdt + 0x2f(%rip)          /*   base 31:24 */
    shrq $16, %rax
    movl %eax, tg_gdt + 0x30(%rip)         /*   base 63:32 */
    movl $TSS_SEL, %eax
    ltr %ax                                /* RSP0 and the I/O permission bitmap */
    leaq tg_vectors(%rip), %rax            /* fill NUM_VECTORS interrupt gates; stubs are */
    leaq tg_idt(%rip), %rdi                /* 16 bytes apart starting at tg_vectors */
    movl $NUM_VECTORS, %ecx
1:  movw %ax, 0(%rdi)                      /* offset 15:0 */
    movw $KERNEL_CS, 2(%rdi)               /* target selector */
    movw $0x8e00, 4(%rdi)                  /* IST 0, present, DPL 0, 64-bit interrupt gate */
    movq %rax, %rdx
    shrq $16, %rdx
    movw %dx, 6(%rdi)                      /* offset 31:16 */
    shrq $16, %rdx
    movl %edx, 8(%rdi)                     /* offset 63:32 */
    movl $0, 12(%rdi)                      /* reserved */
    addq $16, %rax
    addq $16, %rdi
    decl %ecx
    jnz 1b
    lidt tg_idt_ptr(%rip)
    leaq tg_pml4(%rip), %rax
    movq %rax, %cr3                        /* our page tables (identity, user-accessible) */
    movq %cr0, %rax
    andq $~CR0_EM, %rax                    /* no x87 emulation */
    orq $(CR0_MP | CR0_NE), %rax           /* native FPU error reporting */
    movq %rax, %cr0
    movq %cr4, %rax
    orq $(CR4_OSFXSR | CR4_OSXMMEXCPT), %rax /* enable SSE (FXSAVE-aware OS, #XM) */
    movq %rax, %cr4
    leaq tg_kstack_top - 40(%rip), %rsp    /* build the IRETQ frame with movs: */
    leaq tg_user_entry(%rip), %rax
    movq %rax, 0(%rsp)                     /*   RIP */
    movq $USER_CS, 8(%rsp)                 /*   CS (CPL 3) */
    movq $0x2, 16(%rsp)                    /*   RFLAGS: IF=0, IOPL=0 */
    leaq tg_ustack_top(%rip), %rax
    movq %rax, 24(%rsp)                    /*   RSP */
    movq $USER_DS, 32(%rsp)                /*   SS */
    iretq                                  /* drop to ring 3 */

    /* Exception stubs (CPL0), one per vector, 16 bytes apart. Each records its vector and
       jumps to the common code for vectors with or without an error code. */
    .balign 16
tg_vectors:
    .irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    .balign 16
    .if \v == 6
    jmp tg_ud_gate                         /* #UD: maybe the IF gate, see below */
    .else
    movq $\v, tg_fault_vector(%rip)
    .if (\v == 8) || (\v >= 10 && \v <= 14) || (\v == 17) || (\v == 21) || (\v == 29) || (\v == 30)
    jmp tg_fault_err_code
    .else
    jmp tg_fault_no_err
    .endif
    .endif
    .endr

    /* Device interrupt stubs, vectors IRQ_BASE.., continuing the 16-byte stride: count the
       delivery, then EOI (except the spurious vector, which must not EOI) and IRETQ. */
    .irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15
    .balign 16
    incq tg_irq_counts + 8 * \n(%rip)
    .if (IRQ_BASE + \n) == SPURIOUS
    jmp tg_irq_iret
    .else
    jmp tg_irq_eoi
    .endif
    .endr

    /* Common tail of the device interrupt stubs (4 instructions + IRETQ). RAX is saved in
       memory (no push at CPL0); interrupt gates keep IF clear, so nothing nests here. */
tg_irq_eoi:
    movq %rax, tg_irq_rax(%rip)
    movl $LAPIC_EOI, %eax                  /* zero-extended: the identity-mapped LAPIC */
    movl $0, (%rax)                        /* end of interrupt */
    movq tg_irq_rax(%rip), %rax
tg_irq_iret:
    iretq

    /* #UD. At tg_if_gate (ring 3's `tg_set_if`) it is a request to set RFLAGS.IF = RDI & 1:
       rewrite IF in the frame, skip the 2-byte ud2 and return. Anywhere else it is a fault. */
tg_ud_gate:
    movq %rax, tg_ud_rax(%rip)
    leaq tg_if_gate(%rip), %rax
    cmpq %rax, 0(%rsp)                     /* faulting RIP */
    movq tg_ud_rax(%rip), %rax             /* (mov keeps the flags) */
    jne 3f
    addq $2, 0(%rsp)                       /* resume after the ud2 */
    andq $~RFLAGS_IF, 16(%rsp)
    testq $1, %rdi
    jz 4f
    orq $RFLAGS_IF, 16(%rsp)
4:  iretq
3:  movq $6, tg_fault_vector(%rip)
    jmp tg_fault_no_err

tg_fault_err_code:
    movq 0(%rsp), %rax                     /* error code pushed by the CPU */
    movq %rax, tg_fault_err(%rip)
    addq $8, %rsp                          /* now RSP points at the IRETQ frame */
    jmp 2f
tg_fault_no_err:
    movq $0, tg_fault_err(%rip)
2:  movq 0(%rsp), %rax                     /* faulting RIP */
    movq %rax, tg_fault_rip(%rip)
    movq %cr2, %rax                        /* page-fault address */
    movq %rax, tg_fault_cr2(%rip)
    leaq tg_fault_entry(%rip), %rax        /* rewrite the frame so IRETQ resumes in ring 3 */
    movq %rax, 0(%rsp)                     /*   RIP = the ring-3 reporter */
    movq $USER_CS, 8(%rsp)                 /*   CS */
    movq $0x2, 16(%rsp)                    /*   RFLAGS */
    leaq tg_fstack_top(%rip), %rax
    movq %rax, 24(%rsp)                    /*   RSP = the fault stack */
    movq $USER_DS, 32(%rsp)                /*   SS */
    iretq

    /* Ring 3 from here on. */
tg_user_entry:
    leaq __bss_start(%rip), %rdi           /* zero .bss (stacks, page-directory pool) */
    leaq __bss_end(%rip), %rcx
    subq %rdi, %rcx
    xorl %eax, %eax
    cld
    rep stosb
    leaq tg_ustack_top(%rip), %rsp
    call tg_main
    ud2

tg_fault_entry:
    leaq tg_fstack_top(%rip), %rsp
    call tg_fault_report
    ud2

    /* extern "C" fn tg_set_if(enable: u64), ring 3: the ud2 traps into tg_ud_gate. */
    .globl tg_set_if
tg_set_if:
tg_if_gate:
    ud2
    ret

    .section .data.tg_boot, "aw"
    .balign 8
    .globl tg_boot_protocol, tg_boot_info_ptr
    .globl tg_fault_vector, tg_fault_rip, tg_fault_err, tg_fault_cr2
tg_boot_protocol: .quad 0
tg_boot_info_ptr: .quad 0
tg_fault_vector: .quad 0
tg_fault_rip: .quad 0
tg_fault_err: .quad 0
tg_fault_cr2: .quad 0
tg_irq_rax: .quad 0                       /* RAX while an interrupt stub runs */
tg_ud_rax: .quad 0                        /* RAX while the #UD gate runs */
    .globl tg_irq_counts
tg_irq_counts:
    .fill {irq_vectors}, 8, 0              /* deliveries per device vector */

    .balign 16
tg_gdt:
    .quad 0                                /* null */
    .quad 0x00af9a000000ffff               /* 0x08 kernel code, 64-bit */
    .quad 0x00cf92000000ffff               /* 0x10 kernel data */
    .quad 0x00affa000000ffff               /* 0x18 user code, 64-bit, DPL 3 */
    .quad 0x00cff2000000ffff               /* 0x20 user data, DPL 3 */
    .quad 0x0000890000000000 + (tg_tss_end - tg_tss - 1) /* 0x28 TSS, base patched at entry */
    .quad 0
tg_gdt_end:
    .balign 8
tg_gdt_ptr:
    .word tg_gdt_end - tg_gdt - 1
    .quad tg_gdt

    .balign 8
tg_idt_ptr:
    .word NUM_VECTORS * 16 - 1
    .quad tg_idt

    .balign 4096
    .globl tg_idt
tg_idt:
    .fill NUM_VECTORS * 16, 1, 0

    /* 64-bit TSS: RSP0 for ring 3 -> ring 0 transitions and an I/O permission bitmap that
       allows every port to ring 3 (the bitmap is the only architectural way to give CPL3 port
       I/O that survives on this host; IOPL from our own IRET frame did not). */
    .balign 4096
tg_tss:
    .long 0                                /* reserved */
    .quad tg_kstack_top                    /* RSP0 */
    .quad 0                                /* RSP1 */
    .quad 0                                /* RSP2 */
    .quad 0                                /* reserved */
    .fill 7, 8, 0                          /* IST1..7 */
    .quad 0                                /* reserved */
    .word 0                                /* reserved */
    .word tg_iomap - tg_tss                /* I/O map base */
tg_iomap:
    .fill 8192, 1, 0                       /* one bit per port, 0 = allowed */
    .byte 0xff                             /* terminator required after the bitmap */
tg_tss_end:

    /* Page tables, generated at build time: the first 4 GiB identity-mapped with 2 MiB pages,
       every level user-accessible (U/S), the MMIO hole 0xC0000000..4 GiB uncached (PCD|PWT).
       RAM above 4 GiB is mapped from ring 3 with the PD pool in .bss (see paging.rs). */
    .balign 4096
    .globl tg_pml4, tg_pdpt
tg_pml4:
    .quad tg_pdpt + 0x7                    /* present, writable, user */
    .fill 511, 8, 0
tg_pdpt:
    .quad tg_pd0 + 0x7
    .quad tg_pd0 + 0x1000 + 0x7
    .quad tg_pd0 + 0x2000 + 0x7
    .quad tg_pd0 + 0x3000 + 0x7
    .fill 508, 8, 0
tg_pd0:
    .set tg_pde, 0x87                      /* present, writable, user, 2 MiB page */
    .rept 1536
    .quad tg_pde
    .set tg_pde, tg_pde + 0x200000
    .endr
    .rept 512
    .quad tg_pde + 0x18                    /* + PWT|PCD: uncached MMIO hole */
    .set tg_pde, tg_pde + 0x200000
    .endr

    .section .bss.tg_stacks, "aw", @nobits
    .balign 4096
    .globl tg_pd_pool
tg_pd_pool:
    .skip 4096 * {pool}
    .balign 16
    .skip 16384
tg_kstack_top:                             /* CPL0 stack (TSS RSP0) */
    .skip 16384
tg_fstack_top:                             /* ring-3 stack of the fault reporter */
    .skip 262144
tg_ustack_top:                             /* ring-3 stack of the workload */
    "#,
    pool = const PD_POOL_LEN,
    idt_vectors = const IDT_VECTORS,
    irq_base = const IRQ_VECTOR_BASE,
    spurious = const SPURIOUS_VECTOR,
    irq_vectors = const IRQ_VECTORS,
    options(att_syntax)
);

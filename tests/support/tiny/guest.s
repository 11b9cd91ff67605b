/*
 * The tiny test guest: a freestanding 64-bit program booted by `vmm` like a Linux vmlinux
 * (ELF at 1 MiB, entered in long mode with RSI = boot_params, RSP = 0x8ff0, IF = 0).
 *
 * GNU as, AT&T syntax, no C preprocessor. Built by tests/tiny/mod.rs once per scenario:
 *   as --64 --defsym SCENARIO=<n> [--defsym IRQS_OFF=1] guest.s; ld -T link.ld
 * The numbers, ports and addresses below are mirrored in tests/tiny/mod.rs (`guest::*`).
 *
 * The common prologue loads the guest's own GDT, builds an IDT and enables interrupts (unless
 * IRQS_OFF=1); nothing raises interrupts until a scenario programs a timer. Any unexpected
 * exception prints "!EXC vector=<hex> rip=<hex>" and writes the pvpanic port, so a broken
 * scenario ends as GuestPanic with a readable reason.
 *
 * Keep instruction counts small: on the nested PVM-style KVM of the development and CI hosts
 * this guest is emulated instruction by instruction (~1-5 us each) whether IF is 0 or 1, and
 * instructions KVM's emulator does not know (e.g. `int $n`) stop the VM with an internal error.
 */

        /* Scenarios (keep in sync with `Scenario` in mod.rs). */
        .set SC_SERIAL_PIO,        1
        .set SC_MMIO,              2
        .set SC_MEMORY,            3
        .set SC_PIT_TIMER,         4
        .set SC_LAPIC_TIMER,       5
        .set SC_SMP,               6
        .set SC_PANIC,             7
        .set SC_TRIPLE_FAULT,      8    /* ud2 with IF=0 and an empty IDT */
        .set SC_TRIPLE_FAULT_IRQ,  9    /* ud2 with IF=1 and an empty IDT */
        .set SC_EXCEPTION,        10    /* ud2 with the guest's IDT: handler reports it */
        .set SC_SNAP_TICKS,       11    /* numbered timer ticks + serial registers (snapshot) */
        .set SC_SNAP_STREAM,      12    /* endless numbered serial lines (snapshot) */
        .set SC_SNAP_VIRTIO,      13    /* virtio-blk read in flight, then a write (snapshot) */
        .set SC_SNAP_DIRTY,       14    /* writes host-chosen qwords on command (snapshot dedup) */
        .set SC_SNAP_ECHO,        15    /* echoes COM1 input, reading RBR only (snapshot) */
        .set SC_VIRTIO_READS,     16    /* virtio-blk reads one after another, host-paced */
        .set SC_TSC_CLOCK,        17    /* TSC-deadline ticks, guest TSC + kvmclock (snapshot) */

        .ifndef SCENARIO
        .error "assemble with --defsym SCENARIO=<n>"
        .endif
        .ifndef IRQS_OFF
        .set IRQS_OFF, 0
        .endif
        .ifndef TIMER_LAPIC                     /* SC_SNAP_TICKS: 0 = PIT, 1 = LAPIC timer */
        .set TIMER_LAPIC, 0
        .endif
        .ifndef KVMCLOCK                        /* SC_TSC_CLOCK: 1 = also enable kvmclock */
        .set KVMCLOCK, 0
        .endif

        /* Devices and addresses (mirrored in mod.rs). */
        .set COM1,              0x3f8
        .set PVPANIC,           0x505
        .set I8042_CMD,         0x64
        .set TEST_PORT,         0x700           /* the tests' port-I/O device, 16 ports */
        .set MMIO_BASE,         0xd0100000      /* the tests' MMIO device, 4 KiB */
        .set LAPIC,             0xfee00000
        .set MAILBOX,           0x3ff000        /* host <-> guest words */
        .set MB_HOST_GO,        MAILBOX + 0x0   /* u64: host writes HOST_GO */
        .set MB_AP_MARK,        MAILBOX + 0x8   /* u32: AP writes AP_ALIVE */
        .set MB_AP_APIC_ID,     MAILBOX + 0xc   /* u32: AP's LAPIC id */
        .set MB_TICKS,          MAILBOX + 0x10  /* u32: timer interrupts counted */
        .set MB_COUNT,          MAILBOX + 0x14  /* u32: snapshot scenarios' counter (= r12) */
        .set MB_CMD_SEQ,        MAILBOX + 0x18  /* u32: SC_SNAP_DIRTY command number (host) */
        .set MB_CMD_ACK,        MAILBOX + 0x1c  /* u32: last command done (guest) */
        .set MB_CMD_COUNT,      MAILBOX + 0x20  /* u32: qwords to write (host, <= 32) */
        .set MB_TSC,            MAILBOX + 0x28  /* u64: SC_TSC_CLOCK: RDTSC at the last tick */
        .set MB_MISSED,         MAILBOX + 0x30  /* u32: periods skipped at the last tick */
        .set MB_MISSED_MAX,     MAILBOX + 0x34  /* u32: the most periods skipped at one tick */
        .set MB_TSC_BACK,       MAILBOX + 0x38  /* u32: ticks that found the TSC far behind */
        .set MB_PVCLOCK,        MAILBOX + 0x40  /* 32 bytes: kvmclock's pvclock_vcpu_time_info */
        .set MB_CMD_LIST,       MAILBOX + 0x100 /* u64[]: their addresses (host) */
        .set MB_READ_LIMIT,     MAILBOX + 0x24  /* u32: SC_VIRTIO_READS may start reads below this (host) */
        .set HOST_DATA,         MAILBOX + 0x1000 /* 4 KiB the host fills while paused */
        .set HOST_GO,           0x600d600d600d600d
        .set DIRTY_READY,       0x7eadc0de      /* MB_CMD_ACK once SC_SNAP_DIRTY waits for commands */
        .set AP_ALIVE,          0xa11ea11e
        .set AP_REAL_MODE,      0x1e41      /* written by the AP while still in real mode */
        .set PATTERN_BASE,      0x200000
        .set PATTERN_LEN,       0x100000
        .set PATTERN_XOR,       0x5a5aa5a5f00dd00d  /* qword at a = a ^ PATTERN_XOR */
        .set HOST_XOR,          0x0123456789abcdef  /* qword at a = a ^ HOST_XOR */
        .set TRAMP_BASE,        0x10000         /* AP real-mode entry; SIPI vector 0x10 */
        .set TRAMP_RM_MARK,     TRAMP_BASE + 0xff0  /* u32: AP writes AP_REAL_MODE */

        .set VEC_PIT,           0x20            /* master PIC remapped to 0x20..0x27 */
        .set VEC_LAPIC_TIMER,   0x40
        .set TICKS,             10
        .set PIT_DIVISOR,       11932           /* 1193182 Hz / 11932 = 100 Hz */
        .set LAPIC_COUNT,       10000000        /* 10 ms at KVM's 1 GHz APIC bus, divide 1 */
        .set TSC_PERIOD,        25000000        /* SC_TSC_CLOCK: ~10 ms at 2.5 GHz */
        .set MSR_TSC_DEADLINE,  0x6e0
        .set MSR_KVM_SYSTEM_TIME_NEW, 0x4b564d01

        /* Serial register values set by serial_setup and checked by serial_check. */
        .set SER_DLL,           0x03
        .set SER_DLM,           0x01
        .set SER_LCR,           0x1b            /* 8 bits, even parity */
        .set SER_MCR,           0x0b            /* DTR, RTS, OUT2 */
        .set SER_SCR,           0xa7

        /* virtio-blk (disk 0) and the SC_SNAP_VIRTIO virtqueue in guest memory. */
        .set VIRTIO_BASE,       0xd0000000
        .set VQ_SIZE,           8
        .set VQ_DESC,           0x300000        /* 16-byte descriptors */
        .set VQ_AVAIL,          0x301000        /* flags, idx, ring[VQ_SIZE] (u16) */
        .set VQ_USED,           0x302000        /* flags, idx, ring[VQ_SIZE] {u32 id, u32 len} */
        .set REQ_HDR,           0x303000        /* read: type, reserved, sector */
        .set REQ_STATUS,        0x303010
        .set REQ2_HDR,          0x303020        /* write */
        .set REQ2_STATUS,       0x303030
        .set READ_BUF,          0x304000
        .set WRITE_BUF,         0x305000
        .set IO_LEN,            4096
        .set READ_SECTOR,       8
        .set WRITE_SECTOR,      24
        .set DISK_XOR,          0x0d15c0ffee00d15c  /* disk qword at byte offset o = o ^ DISK_XOR */
        .set READ_SLOTS,        64              /* SC_VIRTIO_READS: read k is at slot k % 64 ... */
        .set READ_STRIDE_SHIFT, 9               /* ... = sector slot << 9 (256 KiB apart) */
        .set WRITE_XOR,         0x77aa55cc33ee11ff  /* what the guest writes, likewise */

        .set SEL_CODE64,        0x08
        .set SEL_DATA,          0x10
        .set SEL_CODE32,        0x18

/* PRINT "text": writes a string literal to COM1. Preserves all registers but flags. */
        .macro PRINT str
        .pushsection .rodata
.Lstr\@: .asciz "\str"
        .popsection
        push %rsi
        lea .Lstr\@(%rip), %rsi
        call puts
        pop %rsi
        .endm

/* ------------------------------------------------------------------------------------- */
        .section .text.entry, "ax"
        .code64
        .globl _start
_start:
        lea bsp_stack_top(%rip), %rsp
        mov %rsi, boot_params_ptr(%rip)

        .if SCENARIO == SC_TRIPLE_FAULT
        PRINT "triple fault: ud2 with interrupts off and no IDT\n"
        lidt null_idtr(%rip)
        ud2
        PRINT "survived ud2?\n"
        jmp halt_forever
        .endif

        call load_gdt

        .if SCENARIO == SC_TRIPLE_FAULT_IRQ
        sti
        PRINT "triple fault: ud2 with interrupts on and no IDT\n"
        lidt null_idtr(%rip)
        ud2
        PRINT "survived ud2?\n"
        jmp halt_forever
        .endif

        call setup_idt
        .if IRQS_OFF == 0
        sti
        .endif

        .if SCENARIO == SC_SERIAL_PIO
        jmp serial_pio
        .elseif SCENARIO == SC_MMIO
        jmp mmio
        .elseif SCENARIO == SC_MEMORY
        jmp memory
        .elseif SCENARIO == SC_PIT_TIMER
        jmp pit_timer
        .elseif SCENARIO == SC_LAPIC_TIMER
        jmp lapic_timer
        .elseif SCENARIO == SC_SMP
        jmp smp
        .elseif SCENARIO == SC_PANIC
        jmp panic
        .elseif SCENARIO == SC_EXCEPTION
        jmp exception
        .elseif SCENARIO == SC_SNAP_TICKS
        jmp snap_ticks
        .elseif SCENARIO == SC_SNAP_STREAM
        jmp snap_stream
        .elseif SCENARIO == SC_SNAP_VIRTIO
        jmp snap_virtio
        .elseif SCENARIO == SC_SNAP_DIRTY
        jmp snap_dirty
        .elseif SCENARIO == SC_SNAP_ECHO
        jmp snap_echo
        .elseif SCENARIO == SC_VIRTIO_READS
        jmp virtio_reads
        .elseif SCENARIO == SC_TSC_CLOCK
        jmp tsc_clock
        .elseif SCENARIO == SC_TRIPLE_FAULT || SCENARIO == SC_TRIPLE_FAULT_IRQ
        /* handled above */
        .else
        .error "unknown SCENARIO"
        .endif

/* ------------------------------------------------------------------------------------- */
/* Scenario 1: serial output and port I/O to the test device, then reset. */
serial_pio:
        PRINT "tiny guest: serial ok\n"
        mov $TEST_PORT, %dx
        mov $0xcafef00d, %eax
        out %eax, %dx                   /* 4 bytes at +0 */
        add $4, %dx
        mov $0x5a, %al
        out %al, %dx                    /* 1 byte at +4 */
        add $2, %dx
        mov $0xbeef, %ax
        out %ax, %dx                    /* 2 bytes at +6 */
        add $2, %dx
        in %dx, %eax                    /* 4 bytes at +8: the test answers 0x12345678 */
        mov %eax, %ebx
        PRINT "pio read 0x"
        mov %rbx, %rax
        mov $8, %ecx
        call print_hex
        PRINT "\n"
        cmp $0x12345678, %ebx
        jne fail
        PRINT "pio ok\n"
        jmp reset

/* Scenario 2: 1/2/4/8-byte MMIO writes and reads on the test device (a register file). */
mmio:
        mov $MMIO_BASE, %ebx
        movl $0xdeadbeef, (%rbx)
        movabs $0x0123456789abcdef, %rax
        mov %rax, 8(%rbx)
        movb $0xa5, 0x10(%rbx)
        movw $0x1234, 0x12(%rbx)
        mov 0x20(%rbx), %eax            /* the test preloads 0x11223344 */
        cmp $0x11223344, %eax
        jne fail
        mov 0x28(%rbx), %rax            /* the test preloads 0x8877665544332211 */
        movabs $0x8877665544332211, %rcx
        cmp %rcx, %rax
        jne fail
        mov 8(%rbx), %rax               /* read back what was written */
        movabs $0x0123456789abcdef, %rcx
        cmp %rcx, %rax
        jne fail
        movzbl 0x10(%rbx), %eax
        cmp $0xa5, %eax
        jne fail
        movzwl 0x12(%rbx), %eax
        cmp $0x1234, %eax
        jne fail
        PRINT "mmio ok\n"
        jmp reset

/* Scenario 3: write a pattern the host checks while paused; the host then fills HOST_DATA
 * and sets HOST_GO before resuming; the guest checks HOST_DATA and resets. */
memory:
        mov $PATTERN_BASE, %edi
        mov $(PATTERN_BASE + PATTERN_LEN), %ecx
        movabs $PATTERN_XOR, %rdx
1:      mov %rdi, %rax
        xor %rdx, %rax
        mov %rax, (%rdi)
        add $8, %rdi
        cmp %rcx, %rdi
        jb 1b
        PRINT "pattern written\n"
        mov $TEST_PORT, %dx
        mov $1, %eax
        out %eax, %dx                   /* tell the host */
        movabs $HOST_GO, %rcx
2:      pause
        cmp %rcx, MB_HOST_GO
        jne 2b
        PRINT "host go\n"
        mov $HOST_DATA, %edi
        mov $(HOST_DATA + 0x1000), %ecx
        movabs $HOST_XOR, %rdx
3:      mov %rdi, %rax
        xor %rdx, %rax
        cmp %rax, (%rdi)
        jne fail
        add $8, %rdi
        cmp %rcx, %rdi
        jb 3b
        PRINT "host data ok\n"
        jmp reset

/* Scenario 4: PIT channel 0 at 100 Hz through the (remapped) 8259 PIC, TICKS interrupts. */
pit_timer:
        mov $0x11, %al                  /* ICW1: edge, cascade, ICW4 */
        out %al, $0x20
        out %al, $0xa0
        mov $VEC_PIT, %al               /* ICW2: vector bases */
        out %al, $0x21
        mov $(VEC_PIT + 8), %al
        out %al, $0xa1
        mov $0x04, %al                  /* ICW3: slave on IRQ2 */
        out %al, $0x21
        mov $0x02, %al
        out %al, $0xa1
        mov $0x01, %al                  /* ICW4: 8086 mode */
        out %al, $0x21
        out %al, $0xa1
        mov $0xfe, %al                  /* unmask IRQ0 only */
        out %al, $0x21
        mov $0xff, %al
        out %al, $0xa1
        mov $0x34, %al                  /* channel 0, lobyte/hibyte, mode 2 (rate generator) */
        out %al, $0x43
        mov $(PIT_DIVISOR & 0xff), %al
        out %al, $0x40
        mov $(PIT_DIVISOR >> 8), %al
        out %al, $0x40
        sti
1:      hlt
        cmpl $TICKS, MB_TICKS
        jb 1b
        mov $0xff, %al                  /* mask the PIT again */
        out %al, $0x21
        PRINT "timer: "
        mov $TICKS, %eax
        call print_dec
        PRINT " PIT ticks\n"
        jmp reset

/* Scenario 5: LAPIC timer, periodic, vector VEC_LAPIC_TIMER, TICKS interrupts. */
lapic_timer:
        mov $LAPIC, %ebx
        movl $0x1ff, 0xf0(%rbx)         /* SVR: APIC enabled, spurious vector 0xff */
        movl $0xb, 0x3e0(%rbx)          /* divide by 1 */
        movl $(0x20000 | VEC_LAPIC_TIMER), 0x320(%rbx)  /* LVT timer: periodic */
        movl $LAPIC_COUNT, 0x380(%rbx)  /* initial count: starts the timer */
        sti
1:      hlt
        cmpl $TICKS, MB_TICKS
        jb 1b
        movl $0x10000, 0x320(%rbx)      /* mask */
        PRINT "timer: "
        mov $TICKS, %eax
        call print_dec
        PRINT " LAPIC timer ticks\n"
        jmp reset

/* Scenario 6: start vCPU 1 with INIT + SIPI; it goes real -> protected -> long mode. */
smp:
        PRINT "bsp: starting ap\n"
        lea tramp_start(%rip), %rsi
        mov $TRAMP_BASE, %edi
        mov $(tramp_end - tramp_start), %ecx
        cld
        rep movsb
        mov %cr3, %rax
        mov %eax, TRAMP_BASE + (tramp_cr3 - tramp_start)
        mov $LAPIC, %ebx
        movl $0x1ff, 0xf0(%rbx)         /* SVR: APIC enabled */
        movl $(1 << 24), 0x310(%rbx)    /* ICR high: destination APIC id 1 */
        movl $0x4500, 0x300(%rbx)       /* ICR low: INIT, assert */
1:      testl $0x1000, 0x300(%rbx)      /* delivery status */
        jnz 1b
        movl $(1 << 24), 0x310(%rbx)
        movl $(0x4600 | (TRAMP_BASE >> 12)), 0x300(%rbx)   /* SIPI */
2:      testl $0x1000, 0x300(%rbx)
        jnz 2b
3:      pause
        cmpl $AP_ALIVE, MB_AP_MARK
        jne 3b
        PRINT "bsp: ap is up\n"
        jmp reset

ap_main:                                /* 64-bit entry of the AP, from the trampoline */
        mov $SEL_DATA, %ax
        mov %ax, %ds
        mov %ax, %es
        mov %ax, %ss
        lea ap_stack_top(%rip), %rsp
        lidt idt_desc(%rip)
        sti
        mov $LAPIC, %ebx
        mov 0x20(%rbx), %eax            /* LAPIC ID register: id in bits 31:24 */
        shr $24, %eax
        mov %eax, MB_AP_APIC_ID
        PRINT "ap: long mode, apic id "
        call print_dec
        PRINT "\n"
        movl $AP_ALIVE, MB_AP_MARK
        jmp halt_forever

/* Scenario 7: pvpanic. */
panic:
        PRINT "panic: writing 1 to port 0x505\n"
        mov $1, %al
        mov $PVPANIC, %dx
        out %al, %dx
        jmp halt_forever

/* Scenario 10: an exception with the guest's own IDT. */
exception:
        PRINT "exception: ud2\n"
        ud2
        PRINT "survived ud2?\n"
        jmp halt_forever

/* Scenario 11: a timer (PIT, or the LAPIC timer with TIMER_LAPIC=1) ticks; for every tick
 * the main loop increments r12 and MB_COUNT, checks they agree and that the serial registers
 * still hold what serial_setup wrote, and prints "tick <r12>". Runs until the host stops it.
 * A snapshot/restore in between must continue the numbering without gap or repeat. */
snap_ticks:
        call serial_setup
        PRINT "serial set\n"
        xor %r12d, %r12d
        movl $0, MB_COUNT
        .if TIMER_LAPIC
        mov $0xff, %al                  /* PIC: everything masked */
        call pic_init
        mov $LAPIC, %ebx
        movl $0x1ff, 0xf0(%rbx)         /* SVR: APIC enabled, spurious vector 0xff */
        movl $0xb, 0x3e0(%rbx)          /* divide by 1 */
        movl $(0x20000 | VEC_LAPIC_TIMER), 0x320(%rbx)  /* LVT timer: periodic */
        movl $LAPIC_COUNT, 0x380(%rbx)  /* initial count: starts the timer */
        .else
        mov $0xfe, %al                  /* PIC: IRQ0 (PIT) only */
        call pic_init
        mov $0x34, %al                  /* channel 0, lobyte/hibyte, mode 2 (rate generator) */
        out %al, $0x43
        mov $(PIT_DIVISOR & 0xff), %al
        out %al, $0x40
        mov $(PIT_DIVISOR >> 8), %al
        out %al, $0x40
        .endif
        sti
1:      hlt
2:      cmp MB_TICKS, %r12d
        jae 1b
        inc %r12d
        incl MB_COUNT
        cmp MB_COUNT, %r12d
        jne 3f
        call serial_check
        jne 4f
        PRINT "tick "
        mov %r12d, %eax
        call print_dec
        PRINT "\n"
        jmp 2b
3:      PRINT "ticks: r12 and MB_COUNT differ\n"
        jmp fail
4:      PRINT "ticks: serial registers changed\n"
        jmp fail

/* Scenario 12: prints 1, 2, 3, ... one number per line, as fast as the UART takes them;
 * the number is kept in r12 and MB_COUNT, which must agree. Runs until the host stops it. */
snap_stream:
        xor %r12d, %r12d
        movl $0, MB_COUNT
1:      inc %r12d
        incl MB_COUNT
        cmp MB_COUNT, %r12d
        jne 2f
        mov %r12d, %eax
        call print_dec
        PRINT "\n"
        jmp 1b
2:      PRINT "\nstream: r12 and MB_COUNT differ\n"
        jmp fail

/* Scenario 13: drives virtio-blk disk 0 through virtio-mmio with an 8-entry split virtqueue
 * (no interrupts: the guest polls the used ring). Posts a 4 KiB read of READ_SECTOR and
 * notifies, prints "virtio: read posted", then waits for the host's MB_HOST_GO before
 * looking at the used ring: the host snapshots in between (with the request pending or
 * completed) and restores. Then checks the data, writes 4 KiB at WRITE_SECTOR, resets.
 * Failures print "virtio: FAIL step <n>" (r13 = step) and panic. */
snap_virtio:
        call virtio_init
        /* The read: header (device-readable), data and status (device-writable). */
        movl $0, REQ_HDR                /* VIRTIO_BLK_T_IN */
        movl $0, REQ_HDR + 4
        movq $READ_SECTOR, REQ_HDR + 8
        movb $0xff, REQ_STATUS
        mov $VQ_DESC, %edi
        movq $REQ_HDR, 0x00(%rdi)       /* desc 0 */
        movl $16, 0x08(%rdi)
        movw $1, 0x0c(%rdi)             /* NEXT */
        movw $1, 0x0e(%rdi)
        movq $READ_BUF, 0x10(%rdi)      /* desc 1 */
        movl $IO_LEN, 0x18(%rdi)
        movw $3, 0x1c(%rdi)             /* NEXT | WRITE */
        movw $2, 0x1e(%rdi)
        movq $REQ_STATUS, 0x20(%rdi)    /* desc 2 */
        movl $1, 0x28(%rdi)
        movw $2, 0x2c(%rdi)             /* WRITE */
        movw $0, 0x2e(%rdi)
        movw $0, VQ_AVAIL + 4           /* ring[0] = head 0 */
        movw $1, VQ_AVAIL + 2           /* idx = 1 */
        movl $0, 0x50(%rbx)             /* QueueNotify: queue 0 */
        PRINT "virtio: read posted\n"
        movabs $HOST_GO, %rcx
1:      pause
        cmp %rcx, MB_HOST_GO
        jne 1b
        PRINT "virtio: go\n"
2:      pause
        cmpw $1, VQ_USED + 2            /* used idx */
        jb 2b
        inc %r13d
        cmpl $0, VQ_USED + 4            /* used ring[0].id */
        jne vfail
        inc %r13d
        cmpl $(IO_LEN + 1), VQ_USED + 8 /* used ring[0].len: data + status */
        jne vfail
        inc %r13d
        cmpb $0, REQ_STATUS             /* VIRTIO_BLK_S_OK */
        jne vfail
        inc %r13d
        mov $READ_BUF, %edi
        mov $(READ_SECTOR * 512), %esi  /* disk offset */
        movabs $DISK_XOR, %rdx
3:      mov %rsi, %rax
        xor %rdx, %rax
        cmp %rax, (%rdi)
        jne vfail
        add $8, %rdi
        add $8, %rsi
        cmp $(READ_BUF + IO_LEN), %edi
        jb 3b
        PRINT "virtio: read ok\n"

        /* The write: descriptors 3..5, data from WRITE_BUF. */
        mov $WRITE_BUF, %edi
        mov $(WRITE_SECTOR * 512), %esi
        movabs $WRITE_XOR, %rdx
4:      mov %rsi, %rax
        xor %rdx, %rax
        mov %rax, (%rdi)
        add $8, %rdi
        add $8, %rsi
        cmp $(WRITE_BUF + IO_LEN), %edi
        jb 4b
        movl $1, REQ2_HDR               /* VIRTIO_BLK_T_OUT */
        movl $0, REQ2_HDR + 4
        movq $WRITE_SECTOR, REQ2_HDR + 8
        movb $0xff, REQ2_STATUS
        mov $(VQ_DESC + 3 * 16), %edi
        movq $REQ2_HDR, 0x00(%rdi)      /* desc 3 */
        movl $16, 0x08(%rdi)
        movw $1, 0x0c(%rdi)             /* NEXT */
        movw $4, 0x0e(%rdi)
        movq $WRITE_BUF, 0x10(%rdi)     /* desc 4 */
        movl $IO_LEN, 0x18(%rdi)
        movw $1, 0x1c(%rdi)             /* NEXT (device-readable) */
        movw $5, 0x1e(%rdi)
        movq $REQ2_STATUS, 0x20(%rdi)   /* desc 5 */
        movl $1, 0x28(%rdi)
        movw $2, 0x2c(%rdi)             /* WRITE */
        movw $0, 0x2e(%rdi)
        movw $3, VQ_AVAIL + 6           /* ring[1] = head 3 */
        movw $2, VQ_AVAIL + 2           /* idx = 2 */
        movl $0, 0x50(%rbx)             /* QueueNotify */
5:      pause
        cmpw $2, VQ_USED + 2
        jb 5b
        inc %r13d
        cmpl $3, VQ_USED + 12           /* used ring[1].id */
        jne vfail
        inc %r13d
        cmpl $1, VQ_USED + 16           /* used ring[1].len: status only */
        jne vfail
        inc %r13d
        cmpb $0, REQ2_STATUS
        jne vfail
        inc %r13d
        cmpw $2, VQ_USED + 2            /* nothing completed twice */
        jne vfail
        PRINT "virtio: write ok\n"
        jmp reset
vfail:
        PRINT "virtio: FAIL step "
        mov %r13d, %eax
        call print_dec
        PRINT "\n"
        jmp fail

/* virtio_init: resets and initializes disk 0 (virtio-mmio at VIRTIO_BASE) with one queue of
 * VQ_SIZE entries at VQ_DESC/VQ_AVAIL/VQ_USED, features VERSION_1 only, no interrupts.
 * Leaves RBX = VIRTIO_BASE and R13 = the step counter vfail reports; jumps to vfail on error. */
virtio_init:
        mov $0xff, %al                  /* PIC: everything masked */
        call pic_init
        mov $VIRTIO_BASE, %ebx
        mov $1, %r13d
        cmpl $0x74726976, 0x00(%rbx)    /* magic "virt" */
        jne vfail
        inc %r13d
        cmpl $2, 0x04(%rbx)             /* version 2 */
        jne vfail
        inc %r13d
        cmpl $2, 0x08(%rbx)             /* device id: block */
        jne vfail
        movl $0, 0x70(%rbx)             /* status: reset */
        movl $1, 0x70(%rbx)             /* ACKNOWLEDGE */
        movl $3, 0x70(%rbx)             /* DRIVER */
        movl $1, 0x14(%rbx)             /* DeviceFeaturesSel: bits 63:32 */
        inc %r13d
        testl $1, 0x10(%rbx)            /* VIRTIO_F_VERSION_1 */
        jz vfail
        movl $1, 0x24(%rbx)             /* DriverFeaturesSel: bits 63:32 */
        movl $1, 0x20(%rbx)             /* VIRTIO_F_VERSION_1 */
        movl $0, 0x24(%rbx)
        movl $0, 0x20(%rbx)             /* nothing else: no EVENT_IDX, no INDIRECT */
        movl $0xb, 0x70(%rbx)           /* FEATURES_OK */
        inc %r13d
        testl $8, 0x70(%rbx)
        jz vfail
        movl $0, 0x30(%rbx)             /* QueueSel 0 */
        inc %r13d
        cmpl $VQ_SIZE, 0x34(%rbx)       /* QueueNumMax */
        jb vfail
        movl $VQ_SIZE, 0x38(%rbx)       /* QueueNum */
        movl $VQ_DESC, 0x80(%rbx)
        movl $0, 0x84(%rbx)
        movl $VQ_AVAIL, 0x90(%rbx)
        movl $0, 0x94(%rbx)
        movl $VQ_USED, 0xa0(%rbx)
        movl $0, 0xa4(%rbx)
        movl $1, 0x44(%rbx)             /* QueueReady */
        movl $0xf, 0x70(%rbx)           /* DRIVER_OK */
        inc %r13d
        cmpl $0xf, 0x70(%rbx)
        jne vfail
        movw $1, VQ_AVAIL               /* avail flags: VIRTQ_AVAIL_F_NO_INTERRUPT */
        ret

/* Scenario 16: reads of IO_LEN bytes from disk 0, one request at a time, for ever: read k
 * (R12) is at sector (k % READ_SLOTS) << READ_STRIDE_SHIFT and starts once the host has set
 * MB_READ_LIMIT above k. Each read is checked against the disk pattern and reported as
 * "read <k> ok"; a read the device fails (status IOERR) is reported as "read <k> error" and
 * issued again. MB_COUNT = reads completed. R14 = requests posted (the avail index). */
virtio_reads:
        call virtio_init
        PRINT "reads: ready\n"
        xor %r12d, %r12d
        xor %r14d, %r14d
        mov $VQ_DESC, %edi              /* descriptors 0..2 as in scenario 13 */
        movq $REQ_HDR, 0x00(%rdi)
        movl $16, 0x08(%rdi)
        movw $1, 0x0c(%rdi)             /* NEXT */
        movw $1, 0x0e(%rdi)
        movq $READ_BUF, 0x10(%rdi)
        movl $IO_LEN, 0x18(%rdi)
        movw $3, 0x1c(%rdi)             /* NEXT | WRITE */
        movw $2, 0x1e(%rdi)
        movq $REQ_STATUS, 0x20(%rdi)
        movl $1, 0x28(%rdi)
        movw $2, 0x2c(%rdi)             /* WRITE */
        movw $0, 0x2e(%rdi)
1:      mov MB_READ_LIMIT, %eax
        cmp %eax, %r12d
        jb 2f
        pause
        jmp 1b
2:      movl $0, REQ_HDR                /* VIRTIO_BLK_T_IN */
        movl $0, REQ_HDR + 4
        mov %r12d, %eax
        and $(READ_SLOTS - 1), %eax
        shl $READ_STRIDE_SHIFT, %rax
        mov %rax, REQ_HDR + 8
        movb $0xff, REQ_STATUS
        mov %r14d, %eax
        and $(VQ_SIZE - 1), %eax
        movw $0, (VQ_AVAIL + 4)(,%rax,2)  /* ring[r14 % VQ_SIZE] = head 0 */
        inc %r14d
        movw %r14w, VQ_AVAIL + 2        /* idx */
        movl $0, 0x50(%rbx)             /* QueueNotify */
3:      pause
        cmpw %r14w, VQ_USED + 2
        jne 3b
        cmpb $0, REQ_STATUS
        jne 5f
        mov $READ_BUF, %edi
        mov REQ_HDR + 8, %rsi
        shl $9, %rsi                    /* disk byte offset */
        movabs $DISK_XOR, %rdx
4:      mov %rsi, %rax
        xor %rdx, %rax
        cmp %rax, (%rdi)
        jne vfail
        add $8, %rdi
        add $8, %rsi
        cmp $(READ_BUF + IO_LEN), %edi
        jb 4b
        PRINT "read "
        mov %r12d, %eax
        call print_dec
        PRINT " ok\n"
        inc %r12d
        mov %r12d, MB_COUNT
        jmp 1b
5:      PRINT "read "
        mov %r12d, %eax
        call print_dec
        PRINT " error\n"
        jmp 1b

/* Scenario 14: waits for the host to bump MB_CMD_SEQ, then writes (seq << 32 | address) to
 * each of the MB_CMD_COUNT addresses in MB_CMD_LIST and sets MB_CMD_ACK = seq. The command
 * loop uses no stack and no interrupts, so it changes no memory but what it is told to. */
snap_dirty:
        PRINT "dirty: ready\n"
        /* Past puts (its serial lock released): from here the guest writes nothing until a
         * command, so a snapshot taken after the host saw this marker is always the same. */
        movl $DIRTY_READY, MB_CMD_ACK
        xor %r12d, %r12d
1:      pause
        mov MB_CMD_SEQ, %eax
        cmp %r12d, %eax
        je 1b
        mov %eax, %r12d
        mov MB_CMD_COUNT, %ecx
        mov $MB_CMD_LIST, %esi
2:      test %ecx, %ecx
        jz 3f
        mov (%rsi), %rdi
        mov %r12, %rax
        shl $32, %rax
        or %rdi, %rax
        mov %rax, (%rdi)
        add $8, %rsi
        dec %ecx
        jmp 2b
3:      mov %r12d, MB_CMD_ACK
        jmp 1b

/* Scenario 15: echoes every byte received on COM1. It reads RBR without looking at LSR
 * (an empty FIFO reads as 0, which the host never sends) and writes THR without waiting (the
 * emulated UART is always ready), so nearly every vCPU exit is a one-byte `in` that pops the
 * receive FIFO: pausing there must not lose or repeat a byte across a snapshot. */
snap_echo:
        PRINT "echo: ready\n"
        mov $COM1, %dx
1:      in %dx, %al
        test %al, %al
        jz 1b
        out %al, %dx
        jmp 1b

/* Scenario 16: a periodic tick made of one-shot LAPIC TSC-deadline interrupts, the way Linux
 * runs its periodic tick on a TSC-deadline LAPIC (tick_handle_periodic): at each tick the next
 * deadline is the previous one plus TSC_PERIOD, advanced by whole periods until it lies ahead
 * of RDTSC; the periods skipped are what Linux would catch up one tick_periodic() call each.
 * Each tick prints "tick <n> tsc <RDTSC, 16 hex digits> missed <periods skipped>" and stores
 * RDTSC in MB_TSC, n in MB_COUNT (= r12). A deadline more than 2^32 cycles ahead of RDTSC
 * (the TSC went backwards) is re-based on RDTSC and counted in MB_TSC_BACK. With KVMCLOCK=1
 * kvmclock is enabled first (MSR_KVM_SYSTEM_TIME_NEW = MB_PVCLOCK | 1); the host reads the
 * structure and converts the printed TSC values to kvmclock time. Runs until stopped. */
tsc_clock:
        mov $0xff, %al                  /* PIC: everything masked */
        call pic_init
        .if KVMCLOCK
        mov $MSR_KVM_SYSTEM_TIME_NEW, %ecx
        mov $(MB_PVCLOCK | 1), %eax
        xor %edx, %edx
        wrmsr
        .endif
        xor %r12d, %r12d
        movl $0, MB_COUNT
        mov $LAPIC, %ebx
        movl $0x1ff, 0xf0(%rbx)         /* SVR: APIC enabled, spurious vector 0xff */
        movl $(0x40000 | VEC_LAPIC_TIMER), 0x320(%rbx)  /* LVT timer: TSC-deadline mode */
        rdtsc
        shl $32, %rdx
        or %rdx, %rax
        mov %rax, %r13                  /* r13: the armed deadline */
        add $TSC_PERIOD, %r13
        call arm_deadline
        PRINT "tsc clock\n"
        /* The deadline is one-shot and re-armed below: a tick landing between the check and
         * HLT would leave HLT waiting for a tick nobody arms. Check with IF=0; STI's one-
         * instruction shadow then lets the tick in only once HLT waits. */
1:      cli
        cmp MB_TICKS, %r12d
        jb 2f
        sti
        hlt
        jmp 1b
2:      sti
        inc %r12d
        mov %r12d, MB_COUNT
        rdtsc
        shl $32, %rdx
        or %rdx, %rax
        mov %rax, MB_TSC
        cmp %rax, %r13
        jbe 3f
        mov %r13, %rcx                  /* far ahead (TSC went backwards): re-base */
        sub %rax, %rcx
        shr $32, %rcx
        jz 3f
        incl MB_TSC_BACK
        mov %rax, %r13
3:      xor %r14d, %r14d                /* periods skipped */
4:      add $TSC_PERIOD, %r13
        cmp %rax, %r13
        ja 5f
        inc %r14d
        jmp 4b
5:      mov %r14d, MB_MISSED
        cmp MB_MISSED_MAX, %r14d
        jbe 6f
        mov %r14d, MB_MISSED_MAX
6:      call arm_deadline
        PRINT "tick "
        mov %r12d, %eax
        call print_dec
        PRINT " tsc "
        mov MB_TSC, %rax
        mov $16, %ecx
        call print_hex
        PRINT " missed "
        mov %r14d, %eax
        call print_dec
        PRINT "\n"
        jmp 1b

/* arm_deadline: IA32_TSC_DEADLINE = r13. */
arm_deadline:
        push %rax
        push %rcx
        push %rdx
        mov $MSR_TSC_DEADLINE, %ecx
        mov %r13, %rax
        mov %r13, %rdx
        shr $32, %rdx
        wrmsr
        pop %rdx
        pop %rcx
        pop %rax
        ret

/* ------------------------------------------------------------------------------------- */
/* Common code. */

/* pic_init: AL = master IMR. Initializes both 8259s (master vectors VEC_PIT.., slave
 * VEC_PIT+8..), masks the slave. Clobbers AL. */
pic_init:
        push %rax
        mov $0x11, %al                  /* ICW1: edge, cascade, ICW4 */
        out %al, $0x20
        out %al, $0xa0
        mov $VEC_PIT, %al               /* ICW2: vector bases */
        out %al, $0x21
        mov $(VEC_PIT + 8), %al
        out %al, $0xa1
        mov $0x04, %al                  /* ICW3: slave on IRQ2 */
        out %al, $0x21
        mov $0x02, %al
        out %al, $0xa1
        mov $0x01, %al                  /* ICW4: 8086 mode */
        out %al, $0x21
        out %al, $0xa1
        mov $0xff, %al
        out %al, $0xa1
        pop %rax
        out %al, $0x21
        ret

/* serial_setup: programs COM1's divisor latch, LCR, MCR and scratch register. */
serial_setup:
        push %rax
        push %rdx
        mov $(COM1 + 3), %dx
        mov $0x80, %al                  /* DLAB */
        out %al, %dx
        mov $COM1, %dx
        mov $SER_DLL, %al
        out %al, %dx
        mov $(COM1 + 1), %dx
        mov $SER_DLM, %al
        out %al, %dx
        mov $(COM1 + 3), %dx
        mov $SER_LCR, %al
        out %al, %dx
        mov $(COM1 + 4), %dx
        mov $SER_MCR, %al
        out %al, %dx
        mov $(COM1 + 7), %dx
        mov $SER_SCR, %al
        out %al, %dx
        pop %rdx
        pop %rax
        ret

/* serial_check: ZF=1 when COM1 still holds what serial_setup wrote. */
serial_check:
        push %rax
        push %rcx
        push %rdx
        xor %ecx, %ecx
        mov $(COM1 + 3), %dx
        in %dx, %al
        xor $SER_LCR, %al
        or %al, %cl
        mov $(COM1 + 4), %dx
        in %dx, %al
        xor $SER_MCR, %al
        or %al, %cl
        mov $(COM1 + 7), %dx
        in %dx, %al
        xor $SER_SCR, %al
        or %al, %cl
        mov $(COM1 + 3), %dx
        mov $(SER_LCR | 0x80), %al      /* DLAB on: read the divisor */
        out %al, %dx
        mov $COM1, %dx
        in %dx, %al
        xor $SER_DLL, %al
        or %al, %cl
        mov $(COM1 + 1), %dx
        in %dx, %al
        xor $SER_DLM, %al
        or %al, %cl
        mov $(COM1 + 3), %dx
        mov $SER_LCR, %al               /* DLAB off */
        out %al, %dx
        test %cl, %cl
        pop %rdx
        pop %rcx
        pop %rax
        ret

reset:
        mov $0xfe, %al
        out %al, $I8042_CMD
        jmp halt_forever

fail:
        PRINT "FAIL\n"
        mov $1, %al
        mov $PVPANIC, %dx
        out %al, %dx
        /* fall through */
halt_forever:
        hlt
        jmp halt_forever

/* Loads the guest's own GDT and reloads every segment register (CS by a far return). */
load_gdt:
        lgdt gdt_desc(%rip)
        mov $SEL_DATA, %ax
        mov %ax, %ds
        mov %ax, %es
        mov %ax, %ss
        mov %ax, %fs
        mov %ax, %gs
        pop %rax                        /* return address */
        pushq $SEL_CODE64
        push %rax
        lretq

/* Fills the 256-entry IDT (exceptions -> exc_stubs, timers -> their handlers, the rest ->
 * irq_ignore) and loads it. Runs with IF=0, i.e. emulated on PVM hosts: keep it short. */
setup_idt:
        lea idt(%rip), %rdi
        xor %ecx, %ecx
1:      cmp $32, %ecx
        jae 2f
        mov %ecx, %eax
        shl $4, %eax
        lea exc_stubs(%rip), %rdx
        add %rax, %rdx
        jmp 4f
2:      lea irq_ignore(%rip), %rdx
        cmp $VEC_PIT, %ecx
        jne 3f
        lea irq_pit(%rip), %rdx
3:      cmp $VEC_LAPIC_TIMER, %ecx
        jne 4f
        lea irq_lapic_timer(%rip), %rdx
4:      mov %dx, (%rdi)                 /* offset 15:0 */
        movw $SEL_CODE64, 2(%rdi)
        movw $0x8e00, 4(%rdi)           /* present, DPL 0, 64-bit interrupt gate, IST 0 */
        mov %rdx, %rax
        shr $16, %rax
        mov %ax, 6(%rdi)                /* offset 31:16 */
        shr $16, %rax
        mov %eax, 8(%rdi)               /* offset 63:32 */
        movl $0, 12(%rdi)
        add $16, %rdi
        inc %ecx
        cmp $256, %ecx
        jb 1b
        lidt idt_desc(%rip)
        ret

irq_pit:
        incl MB_TICKS
        push %rax
        mov $0x20, %al                  /* non-specific EOI to the master PIC */
        out %al, $0x20
        pop %rax
        iretq

irq_lapic_timer:
        incl MB_TICKS
        push %rax
        mov $(LAPIC + 0xb0), %eax       /* EOI register */
        movl $0, (%rax)
        pop %rax
        iretq

irq_ignore:
        iretq

        .balign 16
exc_stubs:
        .set vec, 0
        .rept 32
        .balign 16
        pushq $vec
        jmp exc_common
        .set vec, vec + 1
        .endr

/* Stack: vector, [error code], rip, cs, rflags, rsp, ss. */
exc_common:
        PRINT "\n!EXC vector="
        mov (%rsp), %rax
        mov $2, %ecx
        call print_hex
        PRINT " rip="
        mov (%rsp), %rax
        mov $8, %rdx                    /* offset of rip without an error code */
        mov $0x60227d00, %ecx           /* vectors that push an error code */
        bt %eax, %ecx
        jnc 1f
        mov $16, %rdx
1:      mov (%rsp,%rdx), %rax
        mov $16, %ecx
        call print_hex
        PRINT "\n"
        mov $1, %al
        mov $PVPANIC, %dx
        out %al, %dx
        cli
        jmp halt_forever

/* Serial output. The lock keeps strings of different vCPUs apart. */
lock_serial:
        lock btsl $0, serial_lock(%rip)
        jnc 2f
1:      pause
        testl $1, serial_lock(%rip)
        jnz 1b
        jmp lock_serial
2:      ret

unlock_serial:
        movl $0, serial_lock(%rip)
        ret

/* putc: AL = byte. Waits for LSR.THRE, then writes THR. Preserves registers. */
putc:
        push %rax
        push %rdx
        mov %al, %ah
        mov $(COM1 + 5), %dx
1:      in %dx, %al
        test $0x20, %al
        jz 1b
        mov $COM1, %dx
        mov %ah, %al
        out %al, %dx
        pop %rdx
        pop %rax
        ret

/* puts: RSI = NUL-terminated string. Preserves registers. */
puts:
        push %rax
        push %rsi
        call lock_serial
1:      movzbl (%rsi), %eax
        test %al, %al
        jz 2f
        call putc
        inc %rsi
        jmp 1b
2:      call unlock_serial
        pop %rsi
        pop %rax
        ret

/* print_hex: RAX = value, ECX = number of hex digits (from the least significant). */
print_hex:
        push %rax
        push %rbx
        push %rcx
        push %rdx
        mov %rax, %rdx
        lea hex_digits(%rip), %rbx
        call lock_serial
1:      dec %ecx
        js 2f
        mov %rdx, %rax
        push %rcx
        shl $2, %ecx
        shr %cl, %rax
        pop %rcx
        and $0xf, %eax
        movzbl (%rbx,%rax), %eax
        call putc
        jmp 1b
2:      call unlock_serial
        pop %rdx
        pop %rcx
        pop %rbx
        pop %rax
        ret

/* print_dec: EAX = unsigned value. */
print_dec:
        push %rax
        push %rcx
        push %rdx
        push %rsi
        sub $16, %rsp
        lea 15(%rsp), %rsi
        movb $0, (%rsi)
        mov $10, %ecx
1:      xor %edx, %edx
        div %ecx
        add $'0', %dl
        dec %rsi
        mov %dl, (%rsi)
        test %eax, %eax
        jnz 1b
        call puts
        add $16, %rsp
        pop %rsi
        pop %rdx
        pop %rcx
        pop %rax
        ret

/* ------------------------------------------------------------------------------------- */
/* The AP trampoline, copied to TRAMP_BASE and entered by SIPI at TRAMP_BASE>>4:0000 in real
 * mode. Addresses inside it are computed relative to tramp_start. */
        .balign 16
tramp_start:
        .code16
        cli
        mov %cs, %ax
        mov %ax, %ds
        movl $AP_REAL_MODE, TRAMP_RM_MARK - TRAMP_BASE
        lgdtl tramp_gdt_desc - tramp_start
        mov %cr0, %eax
        or $1, %eax                     /* PE */
        mov %eax, %cr0
        ljmpl $SEL_CODE32, $(TRAMP_BASE + tramp32 - tramp_start)

        .code32
tramp32:
        mov $SEL_DATA, %ax
        mov %ax, %ds
        mov %ax, %es
        mov %ax, %ss
        mov %cr4, %eax
        or $0x20, %eax                  /* PAE */
        mov %eax, %cr4
        mov TRAMP_BASE + (tramp_cr3 - tramp_start), %eax
        mov %eax, %cr3
        mov $0xc0000080, %ecx           /* EFER */
        rdmsr
        or $0x900, %eax                 /* LME | NXE */
        wrmsr
        mov %cr0, %eax
        or $0x80000001, %eax            /* PG | PE */
        mov %eax, %cr0
        ljmp $SEL_CODE64, $(TRAMP_BASE + tramp64 - tramp_start)

        .code64
tramp64:
        movabs $ap_main, %rax
        jmp *%rax

        .balign 8
tramp_gdt:
        .quad 0
        .quad 0x00af9a000000ffff        /* 0x08: 64-bit code */
        .quad 0x00cf92000000ffff        /* 0x10: data */
        .quad 0x00cf9a000000ffff        /* 0x18: 32-bit code */
tramp_gdt_desc:
        .word 4 * 8 - 1
        .long TRAMP_BASE + (tramp_gdt - tramp_start)
tramp_cr3:
        .long 0
tramp_end:

/* ------------------------------------------------------------------------------------- */
        .section .rodata
        .balign 16
gdt:
        .quad 0
        .quad 0x00af9a000000ffff        /* 0x08: 64-bit code */
        .quad 0x00cf92000000ffff        /* 0x10: data */
        .quad 0x00cf9a000000ffff        /* 0x18: 32-bit code */
gdt_end:
        .balign 8
gdt_desc:
        .word gdt_end - gdt - 1
        .quad gdt
        .balign 8
idt_desc:
        .word 256 * 16 - 1
        .quad idt
        .balign 8
null_idtr:
        .word 0
        .quad 0
hex_digits:
        .ascii "0123456789abcdef"

        .section .data
        .balign 8
boot_params_ptr:
        .quad 0
serial_lock:
        .long 0

        .section .bss
        .balign 4096
idt:
        .skip 4096
        .skip 16384
bsp_stack_top:
        .skip 16384
ap_stack_top:

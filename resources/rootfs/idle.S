/*
 * /idle - an init that never makes a system call.
 *
 * On the nested PVM KVM hosts guest user space cannot make system calls: a
 * normal /init dies at its first syscall and the kernel panics ("Attempted
 * to kill init"). Booting with rdinit=/idle (initramfs) or init=/idle (ext4
 * root) keeps the guest alive, e.g. for the vmmtest.counter ticks.
 */
	.text
	.globl _start
_start:
1:	pause
	jmp 1b

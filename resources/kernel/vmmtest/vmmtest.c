// SPDX-License-Identifier: GPL-2.0
/*
 * vmmtest - the vmm project's in-kernel test agent.
 *
 * Built into the guest kernel (drivers/misc/vmmtest.c, obj-y) by
 * resources/build-guest.sh. It does nothing unless the kernel command line
 * asks for it through vmmtest.* parameters, because on the nested PVM KVM
 * hosts guest user space cannot make system calls: whatever a test wants the
 * guest to do has to happen in the kernel. See docs/GUEST.md for the
 * interface and the exact output lines.
 *
 *   vmmtest.token=STR          string echoed in the info and tick lines
 *   vmmtest.info               "vmmtest: info cpus=N mem_kib=N token=STR"
 *   vmmtest.disk=/dev/vdX[,/dev/vdY…]  md5 of each whole device
 *   vmmtest.write=TEXT         then write "TEXT\n" (zero-padded) to its last 4 KiB
 *   vmmtest.force_write        send that write even to a read-only device
 *   vmmtest.counter            "vmmtest: tick TOKEN N mono=S.N real=S.N" once a second
 *   vmmtest.counter_disk=/dev/vdX  ... plus read/rewrite/md5 of one block per tick
 *   vmmtest.udp=IP:PORT        ... and each tick as a UDP datagram "tick TOKEN N" to IP:PORT
 *   vmmtest.clock_sync         step the wall clock to kvmclock's (the host's) whenever
 *                              it is more than 100 ms off (boot, restore); checked 1/s
 *   vmmtest.poweroff           kernel_restart() once the one-shot work is done
 *   vmmtest.cpuflags           "vmmtest: cpuflags: fpu vme ..." (the /proc/cpuinfo flags)
 *
 * Always: a panic notifier that writes 1 to I/O port 0x505 (pvpanic).
 */

#include <linux/bio.h>
#include <linux/blkdev.h>
#include <linux/cpumask.h>
#include <linux/delay.h>
#include <linux/err.h>
#include <linux/in.h>
#include <linux/inet.h>
#include <linux/net.h>
#include <linux/socket.h>
#include <linux/uio.h>
#include <net/net_namespace.h>
#include <linux/gfp.h>
#include <linux/init.h>
#include <linux/io.h>
#include <linux/kernel.h>
#include <linux/kthread.h>
#include <linux/ktime.h>
#include <linux/mm.h>
#include <linux/module.h>
#include <linux/moduleparam.h>
#include <linux/mount.h>
#include <linux/notifier.h>
#include <linux/panic_notifier.h>
#include <linux/reboot.h>
#include <linux/sched.h>
#include <linux/slab.h>
#include <linux/string.h>
#include <linux/timekeeping.h>
#include <asm/pvclock.h>
#include <asm/kvmclock.h>
#include <crypto/hash.h>
#include <crypto/md5.h>
#include <asm/cpufeature.h>
#include <asm/processor.h>

/*
 * All agent lines go out at KERN_ERR so that they reach the console even
 * with "quiet" (console loglevel 4) on the command line.
 */
#define vt_out(fmt, ...) printk(KERN_ERR "vmmtest: " fmt "\n", ##__VA_ARGS__)

#define VT_BLOCK	4096u
#define VT_CHUNK_ORDER	4	/* 64 KiB per bio when reading a whole device */
#define VT_CHUNK	(PAGE_SIZE << VT_CHUNK_ORDER)
#define VT_WAIT_MS	30000	/* how long to wait for a disk to appear */
#define PVPANIC_PORT	0x505
#define PVPANIC_PANICKED 1

static char token[128];
module_param_string(token, token, sizeof(token), 0444);
MODULE_PARM_DESC(token, "String echoed in the info and tick lines");

static bool info;
module_param(info, bool, 0444);
MODULE_PARM_DESC(info, "Print one info line (cpus, memory, token)");

static bool counter;
module_param(counter, bool, 0444);
MODULE_PARM_DESC(counter, "Print a tick line once a second");

static char counter_disk[64];
module_param_string(counter_disk, counter_disk, sizeof(counter_disk), 0444);
MODULE_PARM_DESC(counter_disk, "Block device read and rewritten one block per tick");

static bool clock_sync;
module_param(clock_sync, bool, 0444);
MODULE_PARM_DESC(clock_sync, "Step the wall clock to kvmclock's (the host's) when > 100 ms off");

static char disk[128];
module_param_string(disk, disk, sizeof(disk), 0444);
MODULE_PARM_DESC(disk, "Block device to hash as a whole");

static char write_text[512];
module_param_string(write, write_text, sizeof(write_text), 0444);
MODULE_PARM_DESC(write, "Text written to the last 4 KiB block of vmmtest.disk");

static bool force_write;
module_param(force_write, bool, 0444);
MODULE_PARM_DESC(force_write, "Send the write even if the device is read-only");

static char udp[64];
module_param_string(udp, udp, sizeof(udp), 0444);
MODULE_PARM_DESC(udp, "IP:PORT each counter tick is sent to as a UDP datagram (implies counter)");

static bool do_poweroff;
module_param_named(poweroff, do_poweroff, bool, 0444);
MODULE_PARM_DESC(poweroff, "kernel_restart() after the one-shot work (VMM passes reboot=k)");

/* ---- helpers ------------------------------------------------------------ */

/* Wait up to VT_WAIT_MS for the named block device and open it. */
static struct block_device *vt_open(const char *name, fmode_t mode)
{
	char path[80];
	dev_t devt = 0;
	int waited;

	if (strncmp(name, "/dev/", 5) == 0)
		strscpy(path, name, sizeof(path));
	else
		snprintf(path, sizeof(path), "/dev/%s", name);

	for (waited = 0; waited <= VT_WAIT_MS; waited += 100) {
		devt = name_to_dev_t(path);
		if (devt)
			break;
		msleep(100);
	}
	if (!devt)
		return ERR_PTR(-ENODEV);
	return blkdev_get_by_dev(devt, mode, NULL);
}

/* One synchronous bio over @len bytes of @page at byte offset @pos. */
static int vt_bio(struct block_device *bdev, blk_opf_t opf, u64 pos,
		  struct page *page, unsigned int len)
{
	struct bio *bio;
	int ret;

	bio = bio_alloc(bdev, 1, opf, GFP_KERNEL);
	bio->bi_iter.bi_sector = pos >> SECTOR_SHIFT;
	if (bio_add_page(bio, page, len, 0) != len) {
		bio_put(bio);
		return -EIO;
	}
	ret = submit_bio_wait(bio);
	bio_put(bio);
	return ret;
}

static struct crypto_shash *vt_md5_alloc(void)
{
	return crypto_alloc_shash("md5", 0, 0);
}

/* ---- one-shot work: disk hash and write ---------------------------------- */

static void vt_disk_write(const char *dev, struct block_device *bdev, u64 size)
{
	struct page *page;
	size_t n;
	int ret;

	if (size < VT_BLOCK) {
		vt_out("write %s error=%d", dev, -ENOSPC);
		return;
	}
	if (bdev_read_only(bdev) && !force_write) {
		/* What the kernel itself does: blkdev_get_by_path() for writing. */
		vt_out("write %s error=%d", dev, -EACCES);
		return;
	}
	page = alloc_page(GFP_KERNEL | __GFP_ZERO);
	if (!page) {
		vt_out("write %s error=%d", dev, -ENOMEM);
		return;
	}
	n = min_t(size_t, strlen(write_text), VT_BLOCK - 1);
	memcpy(page_address(page), write_text, n);
	((char *)page_address(page))[n] = '\n';

	ret = vt_bio(bdev, REQ_OP_WRITE | REQ_SYNC, size - VT_BLOCK, page, VT_BLOCK);
	if (!ret)
		ret = blkdev_issue_flush(bdev);
	__free_page(page);
	if (ret)
		vt_out("write %s error=%d", dev, ret);
	else
		vt_out("write %s ok", dev);
}

static void vt_disk(const char *dev)
{
	bool want_write = write_text[0] != '\0';
	fmode_t mode = FMODE_READ | (want_write ? FMODE_WRITE : 0);
	struct crypto_shash *tfm = NULL;
	struct block_device *bdev;
	struct page *page = NULL;
	u8 digest[MD5_DIGEST_SIZE];
	u64 size, pos;
	int ret = 0;

	bdev = vt_open(dev, mode);
	if (IS_ERR(bdev)) {
		vt_out("disk %s error=%ld", dev, PTR_ERR(bdev));
		return;
	}
	size = bdev_nr_bytes(bdev);

	tfm = vt_md5_alloc();
	if (IS_ERR(tfm)) {
		ret = PTR_ERR(tfm);
		tfm = NULL;
		goto out;
	}
	page = alloc_pages(GFP_KERNEL, VT_CHUNK_ORDER);
	if (!page) {
		ret = -ENOMEM;
		goto out;
	}

	{
		SHASH_DESC_ON_STACK(desc, tfm);

		desc->tfm = tfm;
		ret = crypto_shash_init(desc);
		for (pos = 0; !ret && pos < size; pos += VT_CHUNK) {
			unsigned int len = min_t(u64, VT_CHUNK, size - pos);

			ret = vt_bio(bdev, REQ_OP_READ, pos, page, len);
			if (!ret)
				ret = crypto_shash_update(desc, page_address(page), len);
			cond_resched();
		}
		if (!ret)
			ret = crypto_shash_final(desc, digest);
	}
out:
	if (ret)
		vt_out("disk %s error=%d", dev, ret);
	else
		vt_out("disk %s md5=%*phN bytes=%llu", dev, MD5_DIGEST_SIZE, digest, size);

	if (!ret && want_write)
		vt_disk_write(dev, bdev, size);

	if (page)
		__free_pages(page, VT_CHUNK_ORDER);
	if (tfm)
		crypto_free_shash(tfm);
	blkdev_put(bdev, mode);
}

static int vt_oneshot_fn(void *unused)
{
	int waited;

	/* Run ahead of a busy /idle init (see docs/GUEST.md). */
	sched_set_fifo_low(current);

	/*
	 * Let the boot finish first (initramfs unpacked, root mounted, init
	 * memory freed), so that mem_kib is the final MemTotal. Bounded, in
	 * case the boot gets stuck somewhere (e.g. rootwait).
	 */
	for (waited = 0; system_state < SYSTEM_RUNNING && waited < 60000; waited += 20)
		msleep(20);

	if (info)
		vt_out("info cpus=%u mem_kib=%lu token=%s", num_online_cpus(),
		       totalram_pages() << (PAGE_SHIFT - 10), token);
	if (disk[0]) {
		/* A comma-separated list of devices, each hashed (and written). */
		char list[sizeof(disk)];
		char *rest = list, *dev;

		strscpy(list, disk, sizeof(list));
		while ((dev = strsep(&rest, ",")) != NULL)
			if (*dev)
				vt_disk(dev);
	} else if (write_text[0])
		vt_out("write needs vmmtest.disk");
	vt_out("done");
	if (do_poweroff) {
		vt_out("poweroff");
		/* reboot=k on the VMM's command line: an i8042 reset = clean exit. */
		kernel_restart(NULL);
	}
	return 0;
}

/* ---- clock --------------------------------------------------------------- */

/* A wall clock closer than this to the host's is left alone (vmmtest.clock_sync). */
#define VT_SYNC_NS	(100 * NSEC_PER_MSEC)

/* Whether the kernel runs kvmclock (not with nopv): kvmclock_init() sets CPU 0's page. */
static bool vt_kvmclock(void)
{
#ifdef CONFIG_KVM_GUEST
	return per_cpu(hv_clock_per_cpu, 0) != NULL;
#else
	return false;
#endif
}

/*
 * vmmtest.clock_sync: keep CLOCK_REALTIME on the host's wall clock.
 *
 * A restored snapshot's monotonic clock continues from the snapshot, and so
 * does the wall clock derived from it, while the host's wall clock moved on;
 * early boot also loses wall time here (the jiffies clock source runs before
 * kvm-clock takes over and misses ticks). kvmclock's wall clock
 * (read_persistent_clock64() -> MSR_KVM_WALL_CLOCK_NEW) is computed by KVM from
 * the host's real time whenever the guest asks, so compare with it and step
 * when they differ by more than VT_SYNC_NS: "vmmtest: clock step <ms> ms"
 * (or "... error=<errno>"). Without kvmclock (nopv) it does nothing.
 *
 * (The VMM's KVM_KVMCLOCK_CTRL flag, PVCLOCK_GUEST_STOPPED, cannot serve as the
 * trigger: every kvmclock read clears it, in pvclock_clocksource_read().)
 */
static void vt_clock_sync(void)
{
	struct timespec64 host, guest;
	s64 delta;
	int ret;

	if (!clock_sync || !vt_kvmclock())
		return;
	read_persistent_clock64(&host);
	ktime_get_real_ts64(&guest);
	delta = timespec64_to_ns(&host) - timespec64_to_ns(&guest);
	if (delta >= -VT_SYNC_NS && delta <= VT_SYNC_NS)
		return;
	ret = do_settimeofday64(&host);
	if (ret)
		vt_out("clock step %lld ms error=%d", div_s64(delta, NSEC_PER_MSEC), ret);
	else
		vt_out("clock step %lld ms", div_s64(delta, NSEC_PER_MSEC));
}

/* Without the counter, clock_sync runs on its own once a second. */
static int vt_clock_fn(void *unused)
{
	while (!kthread_should_stop()) {
		vt_clock_sync();
		msleep(MSEC_PER_SEC);
	}
	return 0;
}

/* " mono=<s>.<ns> real=<s>.<ns>": CLOCK_MONOTONIC and CLOCK_REALTIME now. */
struct vt_times {
	char s[64];
};

static void vt_times(struct vt_times *t)
{
	struct timespec64 mono, real;

	ktime_get_ts64(&mono);
	ktime_get_real_ts64(&real);
	snprintf(t->s, sizeof(t->s), "mono=%lld.%09ld real=%lld.%09ld",
		 (s64)mono.tv_sec, mono.tv_nsec, (s64)real.tv_sec, real.tv_nsec);
}

/* ---- counter ------------------------------------------------------------- */

struct vt_cdisk {
	struct block_device *bdev;
	struct crypto_shash *tfm;
	struct page *page;
	u64 blocks;
};

static int vt_cdisk_open(struct vt_cdisk *c)
{
	fmode_t mode = FMODE_READ | FMODE_WRITE;

	c->bdev = vt_open(counter_disk, mode);
	if (IS_ERR(c->bdev)) {
		int ret = PTR_ERR(c->bdev);

		c->bdev = NULL;
		return ret;
	}
	c->blocks = bdev_nr_bytes(c->bdev) / VT_BLOCK;
	c->tfm = vt_md5_alloc();
	if (IS_ERR(c->tfm)) {
		int ret = PTR_ERR(c->tfm);

		c->tfm = NULL;
		return ret;
	}
	c->page = alloc_page(GFP_KERNEL);
	if (!c->page)
		return -ENOMEM;
	if (c->blocks < 2)
		return -ENOSPC;
	return 0;
}

static void vt_cdisk_tick(struct vt_cdisk *c, u64 n)
{
	u64 idx = n % (c->blocks - 1);	/* never the last block */
	u8 digest[MD5_DIGEST_SIZE];
	struct vt_times t;
	int ret;

	vt_times(&t);

	ret = vt_bio(c->bdev, REQ_OP_READ, idx * VT_BLOCK, c->page, VT_BLOCK);
	if (!ret)
		ret = crypto_shash_tfm_digest(c->tfm, page_address(c->page),
					      VT_BLOCK, digest);
	if (ret) {
		vt_out("tick %s %llu %s blk=%llu error=%d", token, n, t.s, idx, ret);
		return;
	}
	ret = vt_bio(c->bdev, REQ_OP_WRITE | REQ_SYNC, idx * VT_BLOCK, c->page,
		     VT_BLOCK);
	if (!ret)
		ret = blkdev_issue_flush(c->bdev);
	if (ret)
		vt_out("tick %s %llu %s blk=%llu md5=%*phN error=%d", token, n,
		       t.s, idx, MD5_DIGEST_SIZE, digest, ret);
	else
		vt_out("tick %s %llu %s blk=%llu md5=%*phN", token, n, t.s, idx,
		       MD5_DIGEST_SIZE, digest);
}

/* ---- udp: each tick as a datagram ------------------------------------------ */

struct vt_udp {
	struct socket *sock;
	struct sockaddr_in addr;
};

/* Parse vmmtest.udp (IPv4:PORT) and create the kernel socket. */
static int vt_udp_open(struct vt_udp *u)
{
	const char *colon = strrchr(udp, ':');
	u16 port;

	if (!colon || !in4_pton(udp, colon - udp, (u8 *)&u->addr.sin_addr.s_addr,
				':', NULL))
		return -EINVAL;
	if (kstrtou16(colon + 1, 10, &port) || !port)
		return -EINVAL;
	u->addr.sin_family = AF_INET;
	u->addr.sin_port = htons(port);
	return sock_create_kern(&init_net, AF_INET, SOCK_DGRAM, IPPROTO_UDP, &u->sock);
}

/*
 * Payload "tick <token> <n>" (no newline). Non-blocking: a send that fails
 * (no route yet, no buffer) prints "vmmtest: udp <n> error=<errno>" and the
 * tick is not retried. A datagram waiting for ARP is queued by the kernel.
 */
static void vt_udp_send(struct vt_udp *u, u64 n)
{
	struct msghdr msg = {};
	struct kvec iov;
	char buf[160];
	int len, ret;

	len = scnprintf(buf, sizeof(buf), "tick %s %llu", token, n);
	iov.iov_base = buf;
	iov.iov_len = len;
	msg.msg_name = &u->addr;
	msg.msg_namelen = sizeof(u->addr);
	msg.msg_flags = MSG_DONTWAIT;
	ret = kernel_sendmsg(u->sock, &msg, &iov, 1, len);
	if (ret < 0)
		vt_out("udp %llu error=%d", n, ret);
}

static int vt_counter_fn(void *unused)
{
	struct vt_cdisk c = {};
	struct vt_udp u = {};
	bool use_disk = false;
	ktime_t next, now;
	u64 n;

	sched_set_fifo_low(current);
	if (udp[0]) {
		int ret = vt_udp_open(&u);

		if (ret) {
			vt_out("udp %s error=%d", udp, ret);
			u.sock = NULL;
		}
	}
	if (counter_disk[0]) {
		int ret = vt_cdisk_open(&c);

		if (ret)
			vt_out("counter_disk %s error=%d", counter_disk, ret);
		else
			use_disk = true;
	}

	next = ktime_get();
	for (n = 0; !kthread_should_stop(); n++) {
		vt_clock_sync();
		if (use_disk) {
			vt_cdisk_tick(&c, n);
		} else {
			struct vt_times t;

			vt_times(&t);
			vt_out("tick %s %llu %s", token, n, t.s);
		}
		if (u.sock)
			vt_udp_send(&u, n);

		/* One tick per second of monotonic time, without drift ... */
		next = ktime_add_ms(next, MSEC_PER_SEC);
		now = ktime_get();
		/* ... but no burst of ticks after a long stop (e.g. a restore). */
		if (ktime_ms_delta(now, next) > MSEC_PER_SEC)
			next = now;
		if (ktime_after(next, now))
			msleep(ktime_ms_delta(next, now) + 1);
	}
	return 0;
}

/* ---- init ---------------------------------------------------------------- */

static int vt_panic_notify(struct notifier_block *nb, unsigned long event,
			   void *data)
{
	outb(PVPANIC_PANICKED, PVPANIC_PORT);
	return NOTIFY_DONE;
}

static struct notifier_block vt_panic_nb = {
	.notifier_call = vt_panic_notify,
	.priority = INT_MAX,	/* first */
};

static int __init vmmtest_panic_init(void)
{
	atomic_notifier_chain_register(&panic_notifier_list, &vt_panic_nb);
	return 0;
}
early_initcall(vmmtest_panic_init);

static int __init vmmtest_init(void)
{
	struct task_struct *t;

	if (info || disk[0] || write_text[0] || do_poweroff) {
		t = kthread_run(vt_oneshot_fn, NULL, "vmmtest");
		if (IS_ERR(t))
			vt_out("cannot start: %ld", PTR_ERR(t));
	}
	if (counter || udp[0]) {
		t = kthread_run(vt_counter_fn, NULL, "vmmtest-counter");
		if (IS_ERR(t))
			vt_out("cannot start counter: %ld", PTR_ERR(t));
	} else if (clock_sync) {
		t = kthread_run(vt_clock_fn, NULL, "vmmtest-clock");
		if (IS_ERR(t))
			vt_out("cannot start clock sync: %ld", PTR_ERR(t));
	}
	return 0;
}
late_initcall(vmmtest_init);

/* ---- cpuflags: the CPU features the kernel uses ---------------------------- */

static bool cpuflags;
module_param(cpuflags, bool, 0444);
MODULE_PARM_DESC(cpuflags, "Print the boot CPU's feature flags, named as in /proc/cpuinfo");

#define VT_FLAGS_LINE	600	/* printk lines stay well below LOG_LINE_MAX */

/*
 * "vmmtest: cpuflags: fpu vme ..." (as many lines as needed), then
 * "vmmtest: cpuflags done n=<count>": every feature flag of boot_cpu_data
 * that has a name, i.e. the "flags" line of /proc/cpuinfo, which guest user
 * space cannot read on the PVM hosts. A late_initcall of its own, so that it
 * stays independent of the other jobs.
 */
static int __init vmmtest_cpuflags_init(void)
{
	char *line;
	int len = 0, n = 0;
	unsigned int bit;

	if (!cpuflags)
		return 0;
	line = kmalloc(VT_FLAGS_LINE + 64, GFP_KERNEL);
	if (!line) {
		vt_out("cpuflags error=%d", -ENOMEM);
		return 0;
	}
	for (bit = 0; bit < 32 * NCAPINTS; bit++) {
		const char *name = x86_cap_flags[bit];

		if (!name || !cpu_has(&boot_cpu_data, bit))
			continue;
		len += scnprintf(line + len, VT_FLAGS_LINE + 64 - len, " %s", name);
		n++;
		if (len >= VT_FLAGS_LINE) {
			vt_out("cpuflags:%s", line);
			len = 0;
		}
	}
	if (len)
		vt_out("cpuflags:%s", line);
	vt_out("cpuflags done n=%d", n);
	kfree(line);
	return 0;
}
late_initcall(vmmtest_cpuflags_init);

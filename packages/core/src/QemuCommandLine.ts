/**
 * The QEMU command line the standalone host profile starts for a VM: a documented subset of a
 * Proxmox config (machine, memory, cores/sockets, disks on scsi/virtio/sata/ide, the guest agent,
 * and Proxmox's `args:` passthrough), with the QMP and guest-agent sockets in a run directory.
 * Node names follow qemu-server's: `file-<virtdev>` for the protocol node, `drive-<virtdev>` for the
 * format node that the device uses and the backup reads.
 *
 * @since 0.1.0
 */

/**
 * One disk as the launcher attaches it.
 *
 * @since 0.1.0
 * @category models
 */
export interface LaunchDisk {
  readonly virtdev: string
  readonly path: string
  /** `raw` or `qcow2` (any QEMU block format driver name). */
  readonly format: string
  readonly readOnly?: boolean
  /** Gives the disk its own iothread (virtio and virtio-scsi). */
  readonly iothread?: boolean
}

/**
 * @since 0.1.0
 * @category models
 */
export interface LaunchSpec {
  readonly vmid: number
  readonly name?: string
  /** `q35` (default) or `pc`, optionally with a version (`pc-q35-7.2`). */
  readonly machine?: string
  /** MiB, default 512. */
  readonly memory?: number
  readonly cores?: number
  readonly sockets?: number
  readonly disks: ReadonlyArray<LaunchDisk>
  readonly agent: boolean
  /** Extra arguments, already split (Proxmox `args:`). */
  readonly extraArgs?: ReadonlyArray<string>
  /** `kvm`, `tcg`, or `kvm:tcg` (KVM, falling back to TCG). */
  readonly accel: "kvm" | "tcg" | "kvm:tcg"
}

/**
 * Socket and file paths inside a VM's run directory.
 *
 * @since 0.1.0
 * @category models
 */
export interface RunPaths {
  readonly dir: string
  readonly qmp: string
  readonly qga: string
  readonly pid: string
  readonly serial: string
}

/**
 * @since 0.1.0
 * @category constructors
 */
export const runPaths = (dir: string): RunPaths => ({
  dir,
  qmp: `${dir}/qmp.sock`,
  qga: `${dir}/qga.sock`,
  pid: `${dir}/qemu.pid`,
  serial: `${dir}/serial.log`
})

const busFor = (virtdev: string): "scsi" | "virtio" | "sata" | "ide" | undefined => {
  const match = /^(scsi|virtio|sata|ide)\d+$/.exec(virtdev)
  return match === null ? undefined : (match[1] as "scsi" | "virtio" | "sata" | "ide")
}

/**
 * Whether the launcher can attach a disk under this config key.
 *
 * @since 0.1.0
 * @category predicates
 */
export const isLaunchable = (virtdev: string): boolean => busFor(virtdev) !== undefined

/**
 * Builds the argument vector (without the program name). `paused` adds `-S` (QEMU starts in
 * `prelaunch`). The process daemonizes and writes its PID to `paths.pid`.
 *
 * @since 0.1.0
 * @category constructors
 */
export const commandLine = (spec: LaunchSpec, paths: RunPaths, options: { readonly paused: boolean }): Array<string> => {
  const machine = spec.machine ?? "q35"
  const args = [
    "-name",
    spec.name !== undefined ? `${spec.name},debug-threads=on` : `vm${spec.vmid}`,
    "-machine",
    `${machine},accel=${spec.accel}`,
    "-m",
    String(spec.memory ?? 512),
    "-smp",
    `${(spec.cores ?? 1) * (spec.sockets ?? 1)},sockets=${spec.sockets ?? 1},cores=${spec.cores ?? 1}`,
    "-nodefaults",
    "-display",
    "none",
    "-serial",
    `file:${paths.serial}`,
    "-qmp",
    `unix:${paths.qmp},server=on,wait=off`,
    "-pidfile",
    paths.pid,
    "-daemonize"
  ]
  if (options.paused) args.push("-S")
  const iothreads = spec.disks.filter((disk) => disk.iothread === true)
  for (const disk of iothreads) args.push("-object", `iothread,id=iothread-${disk.virtdev}`)
  if (spec.disks.some((disk) => busFor(disk.virtdev) === "scsi")) {
    args.push("-device", "virtio-scsi-pci,id=scsihw0")
  }
  if (spec.disks.some((disk) => busFor(disk.virtdev) === "sata")) args.push("-device", "ahci,id=ahci0")
  for (const disk of spec.disks) {
    const bus = busFor(disk.virtdev)
    if (bus === undefined) continue
    const ro = disk.readOnly === true ? ",read-only=on" : ""
    args.push(
      "-blockdev",
      `driver=file,filename=${disk.path.replace(/,/g, ",,")},node-name=file-${disk.virtdev},discard=unmap${ro}`,
      "-blockdev",
      `driver=${disk.format},file=file-${disk.virtdev},node-name=drive-${disk.virtdev},discard=unmap${ro}`
    )
    const index = Number(disk.virtdev.replace(/^\D+/, ""))
    const iothread = disk.iothread === true ? `,iothread=iothread-${disk.virtdev}` : ""
    switch (bus) {
      case "scsi":
        args.push("-device", `scsi-hd,bus=scsihw0.0,channel=0,scsi-id=0,lun=${index},drive=drive-${disk.virtdev},id=${disk.virtdev}`)
        break
      case "virtio":
        args.push("-device", `virtio-blk-pci,drive=drive-${disk.virtdev},id=${disk.virtdev}${iothread}`)
        break
      case "sata":
        args.push("-device", `ide-hd,bus=ahci0.${index},drive=drive-${disk.virtdev},id=${disk.virtdev}`)
        break
      case "ide":
        args.push("-device", `ide-hd,bus=ide.${index},drive=drive-${disk.virtdev},id=${disk.virtdev}`)
        break
    }
  }
  if (spec.agent) {
    args.push(
      "-chardev",
      `socket,path=${paths.qga},server=on,wait=off,id=qga0`,
      "-device",
      "virtio-serial-pci,id=qga-serial",
      "-device",
      "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0"
    )
  }
  if (spec.extraArgs !== undefined) args.push(...spec.extraArgs)
  return args
}

/**
 * Splits Proxmox's `args:` value the way a shell would for plain words, single and double quotes.
 *
 * @since 0.1.0
 * @category parsing
 */
export const splitArgs = (value: string): Array<string> => {
  const out: Array<string> = []
  let current = ""
  let quote: string | undefined
  let started = false
  for (const ch of value) {
    if (quote !== undefined) {
      if (ch === quote) quote = undefined
      else current += ch
    } else if (ch === "'" || ch === "\"") {
      quote = ch
      started = true
    } else if (/\s/.test(ch)) {
      if (started) out.push(current)
      current = ""
      started = false
    } else {
      current += ch
      started = true
    }
  }
  if (started) out.push(current)
  return out
}

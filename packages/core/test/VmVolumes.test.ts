import { assert, describe, it } from "@effect/vitest"
import { Either } from "effect"
import * as VmArchiveConfig from "../src/VmArchiveConfig.js"
import * as VmConfig from "../src/VmConfig.js"
import * as VmVolumes from "../src/VmVolumes.js"
import * as VzdumpLog from "../src/VzdumpLog.js"
import * as configs from "./fixtures/configs.js"

const parse = (text: string) => Either.getOrThrow(VmConfig.parse(text))
const taskLines = (log: ReadonlyArray<VzdumpLog.LogEntry>) => log.flatMap(VzdumpLog.formatTaskLines)

describe("volume selection", () => {
  it("logs include/exclude lines in vzdump's order and sorts the disks by key", () => {
    const selection = VmVolumes.select(parse(configs.full))
    assert.deepStrictEqual(taskLines(selection.log), [
      "INFO: include disk 'scsi0' 'local-lvm:vm-100-disk-1' 32G",
      "INFO: exclude disk 'scsi1' 'local-lvm:vm-100-disk-2' (backup=no)",
      "INFO: include disk 'scsi2' '/dev/disk/by-id/ata-WDC_WD40EFRX-68N32N0_WD-WCC7K1234567' 3907018584K",
      "INFO: include disk 'virtio0' 'nfs-store:100/vm-100-disk-0.qcow2' 10G",
      "INFO: include disk 'efidisk0' 'local-lvm:vm-100-disk-0' 4M",
      "INFO: include disk 'tpmstate0' 'local-lvm:vm-100-disk-3' 4M"
    ])
    assert.deepStrictEqual(
      selection.volumes.map((v) => [v.virtdev, v.qmdevice, v.volid, v.storeid, v.volname, v.format, v.formatSource]),
      [
        ["efidisk0", "drive-efidisk0", "local-lvm:vm-100-disk-0", "local-lvm", "vm-100-disk-0", "raw", "default"],
        ["scsi0", "drive-scsi0", "local-lvm:vm-100-disk-1", "local-lvm", "vm-100-disk-1", "raw", "default"],
        [
          "scsi2",
          "drive-scsi2",
          "/dev/disk/by-id/ata-WDC_WD40EFRX-68N32N0_WD-WCC7K1234567",
          undefined,
          undefined,
          "raw",
          "default"
        ],
        [
          "tpmstate0",
          "drive-tpmstate0-backup",
          "local-lvm:vm-100-disk-3",
          "local-lvm",
          "vm-100-disk-3",
          "raw",
          "fixed"
        ],
        [
          "virtio0",
          "drive-virtio0",
          "nfs-store:100/vm-100-disk-0.qcow2",
          "nfs-store",
          "100/vm-100-disk-0.qcow2",
          "qcow2",
          "extension"
        ]
      ]
    )
    assert.strictEqual(selection.volumes[1]!.size, 32 * 1024 ** 3)
    assert.deepStrictEqual(selection.decisions.map((d) => [d.virtdev, d.included, d.reason]), [
      ["scsi0", true, "backup=yes"],
      ["scsi1", false, "backup=no"],
      ["scsi2", true, "backup=no"],
      ["virtio0", true, "backup=yes"],
      ["efidisk0", true, "backup=yes"],
      ["tpmstate0", true, "backup=yes"]
    ])
    assert.strictEqual(
      VmVolumes.devlist(selection.volumes),
      "drive-efidisk0,drive-scsi0,drive-scsi2,drive-tpmstate0-backup,drive-virtio0"
    )
  })

  it("excludes an EFI disk without OVMF and skips CD-ROMs silently", () => {
    const selection = VmVolumes.select(parse(configs.seabios))
    assert.deepStrictEqual(taskLines(selection.log), [
      "INFO: include disk 'virtio0' 'local:101/vm-101-disk-0.qcow2' 8G",
      "INFO: include disk 'sata0' 'local:101/vm-101-disk-2.vmdk' 1G",
      "INFO: exclude disk 'efidisk0' 'local:101/vm-101-disk-1.raw' (efidisk but no OVMF BIOS)"
    ])
    assert.deepStrictEqual(
      selection.volumes.map((v) => [v.virtdev, v.format]),
      [["sata0", "vmdk"], ["virtio0", "qcow2"]]
    )
  })

  it("gives backup=0 precedence over the EFI rule only with OVMF", () => {
    const withOvmf = VmVolumes.select(parse("bios: ovmf\nefidisk0: local:vm-1-disk-0,backup=0\n"))
    assert.deepStrictEqual(taskLines(withOvmf.log), ["INFO: exclude disk 'efidisk0' 'local:vm-1-disk-0' (backup=no)"])
    const withSeabios = VmVolumes.select(parse("bios: seabios\nefidisk0: local:vm-1-disk-0,backup=0\n"))
    assert.deepStrictEqual(taskLines(withSeabios.log), [
      "INFO: exclude disk 'efidisk0' 'local:vm-1-disk-0' (efidisk but no OVMF BIOS)"
    ])
  })

  it("omits the size when the config has none and honours format=", () => {
    const selection = VmVolumes.select(parse("scsi0: /srv/disk.img,format=qcow2\nsata1: local:vm-1-disk-0,size=1000\n"))
    assert.deepStrictEqual(taskLines(selection.log), [
      "INFO: include disk 'scsi0' '/srv/disk.img'",
      "INFO: include disk 'sata1' 'local:vm-1-disk-0' 1000"
    ])
    assert.deepStrictEqual(selection.volumes.map((v) => [v.virtdev, v.format, v.formatSource]), [
      ["sata1", "raw", "default"],
      ["scsi0", "qcow2", "property"]
    ])
  })

  it("sorts keys as strings, like Perl's sort", () => {
    const text = ["scsi10", "scsi2", "scsi1", "ide3", "virtio0", "sata0"].map((k, i) => `${k}: local:vm-1-disk-${i}\n`)
      .join("")
    const selection = VmVolumes.select(parse(text))
    assert.deepStrictEqual(
      selection.volumes.map((v) => v.virtdev),
      ["ide3", "sata0", "scsi1", "scsi10", "scsi2", "virtio0"]
    )
    assert.deepStrictEqual(
      selection.decisions.map((d) => d.virtdev),
      ["ide3", "scsi1", "scsi2", "scsi10", "virtio0", "sata0"]
    )
  })

  it("selects nothing from a diskless VM", () => {
    const selection = VmVolumes.select(parse("name: empty\nide2: none,media=cdrom\nunused0: local:vm-1-disk-0\n"))
    assert.deepStrictEqual(selection, { volumes: [], decisions: [], log: [] })
  })

  it("parses volume ids", () => {
    assert.deepStrictEqual(VmVolumes.parseVolumeId("local-lvm:vm-100-disk-0"), {
      storeid: "local-lvm",
      volname: "vm-100-disk-0"
    })
    assert.deepStrictEqual(VmVolumes.parseVolumeId("rbd.pool_1:base-9-disk-0/vm-10-disk-0"), {
      storeid: "rbd.pool_1",
      volname: "base-9-disk-0/vm-10-disk-0"
    })
    assert.strictEqual(VmVolumes.parseVolumeId("/dev/sdb"), undefined)
    assert.strictEqual(VmVolumes.parseVolumeId("a:b"), undefined)
    assert.strictEqual(VmVolumes.parseVolumeId("1store:x"), undefined)
  })
})

describe("archive config assembly", () => {
  it("builds qemu-server.conf for a full config", () => {
    const config = parse(configs.full)
    const { volumes } = VmVolumes.select(config)
    const assembled = VmArchiveConfig.assemble(config, volumes, { firewall: "[OPTIONS]\nenable: 1\n" })
    assert.strictEqual(
      assembled.config,
      `#Web server%3A nginx + php-fpm
#
#Owner%3A J%C3%B6rg %25 ops
agent: 1,fstrim_cloned_disks=1
bios: ovmf
boot: order=scsi0;ide2;net0
cores: 4
cpu: x86-64-v2-AES
efidisk0: local-lvm:vm-100-disk-0,efitype=4m,pre-enrolled-keys=1,size=4M
ide0: local-lvm:vm-100-cloudinit,media=cdrom
ide2: local:iso/debian-12.5.0-amd64-netinst.iso,media=cdrom,size=629M
ipconfig0: ip=dhcp
machine: pc-q35-8.1
memory: 4096
meta: creation-qemu=8.1.5,ctime=1712345678
name: web01
net0: virtio=BC:24:11:AA:BB:CC,bridge=vmbr0,firewall=1
numa: 0
ostype: l26
scsi0: local-lvm:vm-100-disk-1,discard=on,iothread=1,size=32G,ssd=1
scsi1: local-lvm:vm-100-disk-2,backup=0,iothread=1,size=500G
scsi2: /dev/disk/by-id/ata-WDC_WD40EFRX-68N32N0_WD-WCC7K1234567,backup=1,size=3907018584K
scsihw: virtio-scsi-single
smbios1: uuid=5b0b3c2e-8d1a-4a7e-9d0e-3f2b1a0c9d8e
sockets: 1
tpmstate0: local-lvm:vm-100-disk-3,size=4M,version=v2.0
virtio0: file=nfs-store:100/vm-100-disk-0.qcow2,cache=writeback,size=10G
vmgenid: 6c5e0d6a-2e4f-4b1c-8a3d-0f9e8d7c6b5a

#qmdump#map:efidisk0:drive-efidisk0:local-lvm:raw:
#qmdump#map:scsi0:drive-scsi0:local-lvm:raw:
#qmdump#map:scsi2:drive-scsi2::raw:
#qmdump#map:tpmstate0:drive-tpmstate0-backup:local-lvm:raw:
#qmdump#map:virtio0:drive-virtio0:nfs-store:qcow2:
`
    )
    assert.deepStrictEqual(taskLines(assembled.log), [
      "INFO: skip unused drive 'local-lvm:vm-100-disk-4' (not included into backup)",
      "INFO: skip unused drive 'nfs-store:100/vm-100-disk-5.qcow2' (not included into backup)",
      "INFO: special config section found (not included into backup)",
      "INFO: snapshots found (not included into backup)",
      "INFO: pending configuration changes found (not included into backup)"
    ])
    assert.strictEqual(assembled.firewall, "[OPTIONS]\nenable: 1\n")
    // what restore reads back
    assert.deepStrictEqual(VmArchiveConfig.parseMapLines(assembled.config), [
      { virtdev: "efidisk0", qmdevice: "drive-efidisk0", storeid: "local-lvm", format: "raw" },
      { virtdev: "scsi0", qmdevice: "drive-scsi0", storeid: "local-lvm", format: "raw" },
      { virtdev: "scsi2", qmdevice: "drive-scsi2", storeid: "", format: "raw" },
      { virtdev: "tpmstate0", qmdevice: "drive-tpmstate0-backup", storeid: "local-lvm", format: "raw" },
      { virtdev: "virtio0", qmdevice: "drive-virtio0", storeid: "nfs-store", format: "qcow2" }
    ])
    // the assembled file is itself a valid config
    assert.strictEqual(Either.isRight(VmConfig.parse(assembled.config)), true)
  })

  it("drops old dump lines, keeps comments and logs only what it found", () => {
    const text = `#qmdump#map:scsi0:drive-scsi0:old:raw:
#vzdump#old marker
#restored VM
lock: backup
memory: 512
parent: snap
scsi0: local:vm-102-disk-0,size=2G
`
    const assembled = VmArchiveConfig.assemble(text, VmVolumes.select(parse(text)).volumes)
    assert.strictEqual(
      assembled.config,
      "#restored VM\nmemory: 512\nscsi0: local:vm-102-disk-0,size=2G\n#qmdump#map:scsi0:drive-scsi0:local:raw:\n"
    )
    assert.deepStrictEqual(assembled.log, [])
    assert.strictEqual(assembled.firewall, undefined)
  })

  it("handles a last line without newline, a diskless VM and unused lines without volume", () => {
    const diskless = VmArchiveConfig.assemble("name: nodisk\nunused3: local:vm-1-disk-9", [])
    assert.strictEqual(diskless.config, "name: nodisk\n")
    assert.deepStrictEqual(taskLines(diskless.log), [
      "INFO: skip unused drive 'local:vm-1-disk-9' (not included into backup)"
    ])
    const unterminated = VmArchiveConfig.assemble("memory: 512", [{ virtdev: "scsi0", qmdevice: "drive-scsi0" }])
    assert.strictEqual(unterminated.config, "memory: 512\n#qmdump#map:scsi0:drive-scsi0:::\n")
  })

  it("stops at the first section whatever it is", () => {
    const text = "memory: 512\n[special:fleecing]\nfleecing-images: x\n[snap]\nunused0: a:b\n"
    const assembled = VmArchiveConfig.assemble(text, [])
    assert.strictEqual(assembled.config, "memory: 512\n")
    assert.deepStrictEqual(taskLines(assembled.log), [
      "INFO: special config section found (not included into backup)",
      "INFO: snapshots found (not included into backup)"
    ])
  })

  it("formats map lines", () => {
    assert.strictEqual(
      VmArchiveConfig.mapLine({ virtdev: "scsi0", qmdevice: "drive-scsi0", storeid: "local-lvm", format: "raw" }),
      "#qmdump#map:scsi0:drive-scsi0:local-lvm:raw:"
    )
    assert.strictEqual(VmArchiveConfig.configName, "qemu-server.conf")
    assert.strictEqual(VmArchiveConfig.firewallName, "qemu-server.fw")
  })
})

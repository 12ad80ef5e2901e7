import { assert, describe, it } from "@effect/vitest"
import { Effect, Either, Schema } from "effect"
import * as VmConfig from "../src/VmConfig.js"
import * as configs from "./fixtures/configs.js"

const GiB = 1024 ** 3
const MiB = 1024 ** 2

const parseOk = (text: string) => {
  const result = VmConfig.parse(text, { vmid: 100, path: "/etc/pve/qemu-server/100.conf" })
  if (Either.isLeft(result)) throw new Error(result.left.message)
  return result.right
}

const parseErr = (text: string) => {
  const result = VmConfig.parse(text, { path: "/x/100.conf" })
  if (Either.isRight(result)) throw new Error("expected a parse error")
  return result.left
}

describe("parse: a full config", () => {
  const config = parseOk(configs.full)
  const main = VmConfig.main(config)

  it("splits main, pending, special and snapshot sections", () => {
    assert.deepStrictEqual(
      config.sections.map((s) => [s.kind, s.name, s.header, s.headerLine]),
      [
        ["main", "", undefined, undefined],
        ["pending", "pending", "[PENDING]", 34],
        ["special", "cloudinit", "[special:cloudinit]", 38],
        ["snapshot", "before-upgrade", "[before-upgrade]", 42],
        ["snapshot", "clean-install", "[clean-install]", 58]
      ]
    )
    assert.deepStrictEqual(VmConfig.snapshots(config).map((s) => s.name), ["before-upgrade", "clean-install"])
    assert.strictEqual(VmConfig.pending(config)?.name, "pending")
    assert.strictEqual(VmConfig.special(config, "CloudInit")?.kind, "special")
    assert.strictEqual(config.vmid, 100)
  })

  it("decodes the typed options", () => {
    assert.strictEqual(main.guestName, "web01")
    assert.strictEqual(VmConfig.name(config), "web01")
    assert.strictEqual(main.bios, "ovmf")
    assert.deepStrictEqual(main.agent, { enabled: true, fstrimClonedDisks: true, freezeFs: undefined, type: undefined })
    assert.strictEqual(main.template, false)
    assert.strictEqual(main.lock, "backup")
    assert.strictEqual(main.memory, 4096)
    assert.strictEqual(main.cores, 4)
    assert.strictEqual(main.sockets, 1)
    assert.strictEqual(main.machine, "pc-q35-8.1")
    assert.strictEqual(main.ostype, "l26")
    assert.strictEqual(main.parent, "before-upgrade")
    assert.strictEqual(VmConfig.get(main, "scsihw"), "virtio-scsi-single")
    assert.strictEqual(VmConfig.get(main, "meta"), "creation-qemu=8.1.5,ctime=1712345678")
    assert.strictEqual(VmConfig.get(main, "nonexistent"), undefined)
  })

  it("percent-decodes the description", () => {
    assert.strictEqual(main.description, "Web server: nginx + php-fpm\n\nOwner: Jörg % ops")
    assert.strictEqual(VmConfig.snapshots(config)[0]!.description, "before the distribution upgrade")
    assert.strictEqual(VmConfig.snapshots(config)[1]!.description, undefined)
  })

  it("lists drives in vzdump's order, with their options", () => {
    assert.deepStrictEqual(main.drives.map((d) => d.key), [
      "ide0",
      "ide2",
      "scsi0",
      "scsi1",
      "scsi2",
      "virtio0",
      "efidisk0",
      "tpmstate0",
      "unused0",
      "unused1"
    ])
    const scsi0 = VmConfig.drive(main, "scsi0")!
    assert.strictEqual(scsi0.file, "local-lvm:vm-100-disk-1")
    assert.strictEqual(scsi0.size, 32 * GiB)
    assert.strictEqual(scsi0.backup, undefined)
    assert.strictEqual(scsi0.isCdrom, false)
    assert.deepStrictEqual(scsi0.options, [
      ["file", "local-lvm:vm-100-disk-1"],
      ["discard", "on"],
      ["iothread", "1"],
      ["size", "32G"],
      ["ssd", "1"]
    ])
    assert.strictEqual(VmConfig.drive(main, "scsi1")!.backup, false)
    assert.strictEqual(VmConfig.drive(main, "scsi2")!.backup, true)
    assert.strictEqual(VmConfig.drive(main, "scsi2")!.file, "/dev/disk/by-id/ata-WDC_WD40EFRX-68N32N0_WD-WCC7K1234567")
    assert.strictEqual(VmConfig.drive(main, "scsi2")!.size, 3907018584 * 1024)
    assert.strictEqual(VmConfig.drive(main, "ide0")!.isCdrom, true)
    assert.strictEqual(VmConfig.drive(main, "ide2")!.media, "cdrom")
    assert.strictEqual(VmConfig.drive(main, "ide2")!.size, 629 * MiB)
    assert.strictEqual(VmConfig.drive(main, "virtio0")!.file, "nfs-store:100/vm-100-disk-0.qcow2")
    assert.strictEqual(VmConfig.drive(main, "efidisk0")!.size, 4 * MiB)
    assert.deepStrictEqual(
      VmConfig.drive(main, "tpmstate0")!.options.find(([k]) => k === "version"),
      ["version", "v2.0"]
    )
    assert.deepStrictEqual(
      [VmConfig.drive(main, "unused1")!.interface, VmConfig.drive(main, "unused1")!.index],
      ["unused", 1]
    )
  })

  it("parses the other sections with their own values", () => {
    const pending = VmConfig.pending(config)!
    assert.strictEqual(pending.memory, 8192)
    assert.strictEqual(VmConfig.get(pending, "delete"), "numa")
    const snapshot = VmConfig.snapshots(config)[0]!
    assert.strictEqual(snapshot.cores, 2)
    assert.strictEqual(VmConfig.get(snapshot, "vmstate"), "local-lvm:vm-100-state-before-upgrade")
    assert.deepStrictEqual(snapshot.drives.map((d) => d.key), ["scsi0", "efidisk0", "tpmstate0"])
    assert.strictEqual(VmConfig.snapshots(config)[1]!.parent, "before-upgrade")
    assert.strictEqual(VmConfig.get(VmConfig.special(config, "cloudinit")!, "ipconfig0"), "ip=dhcp")
  })

  it("serializes back byte for byte", () => {
    assert.strictEqual(VmConfig.serialize(config), configs.full)
  })
})

describe("parse: a small SeaBIOS config", () => {
  const config = parseOk(configs.seabios)
  const main = VmConfig.main(config)

  it("reads the agent's freeze option through its old name", () => {
    assert.deepStrictEqual(
      main.agent,
      { enabled: true, fstrimClonedDisks: undefined, freezeFs: false, type: undefined }
    )
    assert.strictEqual(VmConfig.shouldFreezeFs(main.agent), false)
    assert.strictEqual(main.bios, undefined)
    assert.strictEqual(main.description, undefined)
    assert.deepStrictEqual(main.drives.map((d) => d.key), ["ide2", "virtio0", "sata0", "efidisk0"])
    assert.strictEqual(VmConfig.drive(main, "ide2")!.file, "none")
  })

  it("round-trips, also without a final newline", () => {
    assert.strictEqual(VmConfig.serialize(config), configs.seabios)
    const trimmed = configs.seabios.trimEnd()
    assert.strictEqual(VmConfig.serialize(parseOk(trimmed)), trimmed)
    assert.strictEqual(VmConfig.serialize(parseOk("")), "")
    const crlf = "name: a\r\nmemory: 512\r\n"
    assert.strictEqual(VmConfig.serialize(parseOk(crlf)), crlf)
    assert.strictEqual(VmConfig.main(parseOk(crlf)).memory, 512)
  })
})

describe("agent values", () => {
  const agent = (value: string) => Either.getOrThrow(VmConfig.parseAgent(value))

  it("covers the forms vzdump meets", () => {
    assert.deepStrictEqual(
      agent("1"),
      { enabled: true, fstrimClonedDisks: undefined, freezeFs: undefined, type: undefined }
    )
    assert.deepStrictEqual(
      agent("0"),
      { enabled: false, fstrimClonedDisks: undefined, freezeFs: undefined, type: undefined }
    )
    assert.deepStrictEqual(agent("enabled=1,fstrim_cloned_disks=1"), {
      enabled: true,
      fstrimClonedDisks: true,
      freezeFs: undefined,
      type: undefined
    })
    assert.strictEqual(agent("1,freeze-fs-on-backup=0").freezeFs, false)
    assert.strictEqual(agent("1,guest-fsfreeze=0").freezeFs, false)
    assert.strictEqual(agent("1,freeze-fs=1").freezeFs, true)
    assert.strictEqual(agent("1,type=isa").type, "isa")
    // a disabled agent ignores its other options, as Proxmox's parse_guest_agent does
    assert.deepStrictEqual(agent("0,freeze-fs=0"), {
      enabled: false,
      fstrimClonedDisks: undefined,
      freezeFs: undefined,
      type: undefined
    })
    assert.strictEqual(agent("type=virtio").enabled, false)
  })

  it("decides about freezing", () => {
    assert.strictEqual(VmConfig.shouldFreezeFs(agent("1")), true)
    assert.strictEqual(VmConfig.shouldFreezeFs(agent("1,freeze-fs-on-backup=0")), false)
    assert.strictEqual(VmConfig.shouldFreezeFs(agent("0")), false)
    assert.strictEqual(VmConfig.shouldFreezeFs(undefined), false)
  })

  it("rejects bad agent values", () => {
    assert.strictEqual(Either.isLeft(VmConfig.parseAgent("2")), true)
    assert.strictEqual(Either.isLeft(VmConfig.parseAgent("1,frobnicate=1")), true)
    assert.strictEqual(Either.isLeft(VmConfig.parseAgent("1,1")), true)
  })
})

describe("drive values", () => {
  const drive = (key: string, value: string) => Either.getOrThrow(VmConfig.parseDrive(key, value))

  it("accepts volume ids, paths, file=/volume= and none", () => {
    assert.strictEqual(drive("scsi0", "file=local-lvm:vm-100-disk-0,size=32G").file, "local-lvm:vm-100-disk-0")
    assert.strictEqual(drive("scsi0", "volume=local-lvm:vm-100-disk-0").file, "local-lvm:vm-100-disk-0")
    assert.strictEqual(drive("sata5", "/dev/sdb").file, "/dev/sdb")
    assert.strictEqual(drive("ide2", "none,media=cdrom").isCdrom, true)
    assert.strictEqual(drive("ide2", "cdrom,media=cdrom").file, "cdrom")
    assert.strictEqual(drive("cdrom", "local:iso/x.iso,media=cdrom").key, "ide2")
    assert.strictEqual(drive("scsi30", "local:vm-1-disk-0").index, 30)
    assert.strictEqual(drive("virtio15", "local:vm-1-disk-0").interface, "virtio")
    assert.strictEqual(drive("unused255", "local:vm-1-disk-0").index, 255)
    assert.strictEqual(drive("scsi0", "local:vm-1-disk-0,size=1.5G").size, 1610612736)
    assert.strictEqual(drive("scsi0", "local:vm-1-disk-0,size=4096").size, 4096)
    assert.strictEqual(drive("scsi0", "local:vm-1-disk-0,backup=no").backup, false)
    assert.strictEqual(drive("scsi0", "local:vm-1-disk-0,backup=on").backup, true)
    assert.strictEqual(drive("scsi0", "local:vm-1-disk-0,format=qcow2").format, "qcow2")
    // unknown options are kept
    assert.deepStrictEqual(drive("scsi0", "local:vm-1-disk-0,future-option=x").options[1], ["future-option", "x"])
  })

  it("rejects what Proxmox rejects", () => {
    const reason = (key: string, value: string) => Either.flip(VmConfig.parseDrive(key, value)).pipe(Either.getOrThrow)
    assert.strictEqual(reason("scsi31", "local:vm-1-disk-0"), "invalid drive key: scsi31")
    assert.strictEqual(reason("ide4", "local:vm-1-disk-0"), "invalid drive key: ide4")
    assert.strictEqual(reason("sata6", "local:vm-1-disk-0"), "invalid drive key: sata6")
    assert.strictEqual(reason("efidisk1", "local:vm-1-disk-0"), "invalid drive key: efidisk1")
    assert.strictEqual(reason("unused256", "local:vm-1-disk-0"), "invalid drive key: unused256")
    assert.match(reason("scsi0", "local:vm-1-disk-0,size=12X"), /valid disk size: 12X/)
    assert.match(reason("scsi0", "local:vm-1-disk-0,backup=maybe"), /expected a boolean, got 'maybe'/)
    assert.match(reason("scsi0", "local:vm-1-disk-0,media=tape"), /media/)
    assert.match(reason("scsi0", "local:vm-1-disk-0,format=vdi"), /format/)
    assert.strictEqual(reason("scsi0", "a:b,c:d"), "duplicate key in comma-separated list property: file")
    assert.strictEqual(
      reason("scsi0", "local:vm-1-disk-0,size=1G,size=2G"),
      "duplicate key in comma-separated list property: size"
    )
    assert.strictEqual(reason("scsi0", "local:vm-1-disk-0,size="), "missing key in comma-separated list property")
    assert.strictEqual(reason("scsi0", "vm-1-disk-0"), "invalid volume 'vm-1-disk-0'")
    assert.strictEqual(reason("unused0", "/dev/sdb"), "unused volume '/dev/sdb' is not a volume id")
    assert.strictEqual(reason("virtio0", "local:iso/x.iso,media=cdrom"), "virtio drives cannot be CD-ROMs")
    assert.match(reason("scsi0", "size=32G"), /file/)
  })

  it("knows the drive keys", () => {
    assert.strictEqual(VmConfig.driveKeys.length, 4 + 31 + 16 + 6 + 2)
    assert.strictEqual(VmConfig.driveKeys[4], "scsi0")
    assert.strictEqual(VmConfig.driveKeys[35], "virtio0")
    assert.strictEqual(VmConfig.driveKeys[51], "sata0")
    assert.strictEqual(VmConfig.isDriveKey("unused7"), true)
    assert.strictEqual(VmConfig.isDriveKey("scsi01"), false)
    assert.strictEqual(VmConfig.isDriveKey("net0"), false)
  })
})

describe("value schemas", () => {
  it("decode and encode sizes and booleans", () => {
    assert.strictEqual(Schema.decodeSync(VmConfig.DiskSize)("32G"), 32 * GiB)
    assert.strictEqual(Schema.encodeSync(VmConfig.DiskSize)(500 * MiB), "500M")
    assert.strictEqual(Schema.encodeSync(VmConfig.DiskSize)(1000), "1000")
    assert.strictEqual(Schema.decodeSync(VmConfig.PveBoolean)("YES"), true)
    assert.strictEqual(Schema.decodeSync(VmConfig.PveBoolean)("off"), false)
    assert.strictEqual(Schema.encodeSync(VmConfig.PveBoolean)(true), "1")
    assert.strictEqual(Either.isLeft(Schema.decodeEither(VmConfig.PveBoolean)("2")), true)
  })

  it("encodes and decodes description text like PVE::Tools", () => {
    // `%` itself is not escaped (Proxmox's safe set is 0x20-0x39, 0x3b-0x7e)
    assert.strictEqual(VmConfig.encodeText("a: b % ü\t"), "a%3A b % %C3%BC%09")
    assert.strictEqual(VmConfig.decodeText("a%3A b %25 %C3%BC%09"), "a: b % ü\t")
    assert.strictEqual(VmConfig.decodeText("100%"), "100%")
    assert.strictEqual(VmConfig.decodeText("%zz"), "%zz")
  })
})

describe("parse errors", () => {
  it("names line number, text and reason", () => {
    const error = parseErr("name: ok\nthis is not a config line\nmemory: 512\n")
    assert.strictEqual(error._tag, "VmConfigParseError")
    assert.strictEqual(error.line, 2)
    assert.strictEqual(error.text, "this is not a config line")
    assert.strictEqual(error.reason, "unable to parse config")
    assert.strictEqual(error.message, "/x/100.conf line 2: unable to parse config: 'this is not a config line'")
  })

  it("rejects bad values of typed keys", () => {
    assert.deepStrictEqual(
      [parseErr("cores: many\n").line, parseErr("cores: many\n").reason.startsWith("unable to parse value of 'cores'")],
      [1, true]
    )
    assert.strictEqual(parseErr("name: a\nbios: uefi\n").line, 2)
    assert.strictEqual(parseErr("memory: lots\n").reason.startsWith("unable to parse value of 'memory'"), true)
    assert.strictEqual(parseErr("template: maybe\n").line, 1)
    assert.strictEqual(parseErr("agent: 1,nope=1\n").line, 1)
    const drive = parseErr("name: a\n\nscsi0: local-lvm:vm-100-disk-0,size=big\n")
    assert.strictEqual(drive.line, 3)
    assert.strictEqual(drive.text, "scsi0: local-lvm:vm-100-disk-0,size=big")
    assert.match(drive.reason, /^unable to parse value of 'scsi0' - .*valid disk size: big/)
  })

  it("validates snapshot sections and errors there with their line", () => {
    const error = parseErr("name: a\n\n[snap]\nscsi0: nonsense\n")
    assert.strictEqual(error.line, 4)
  })

  it("does not validate [special:…] sections", () => {
    const config = parseOk("name: a\n\n[special:cloudinit]\nscsi0: nonsense\n")
    assert.strictEqual(VmConfig.get(VmConfig.special(config, "cloudinit")!, "scsi0"), "nonsense")
  })

  it("rejects unknown and duplicate sections and misplaced delete", () => {
    assert.strictEqual(parseErr("[bad name]\n").reason, "unknown section: 'bad name'")
    assert.strictEqual(parseErr("[special:]\n").reason, "unknown section: 'special:'")
    assert.strictEqual(parseErr("[PENDING]\n[pending]\n").reason, "duplicate section: pending")
    assert.strictEqual(parseErr("[a1]\n[a1]\n").reason, "duplicate snapshot section: a1")
    assert.strictEqual(parseErr("[special:cloudinit]\n[special:cloudinit]\n").line, 2)
    assert.strictEqual(parseErr("delete: numa\n").reason, "property 'delete' is only allowed in [PENDING]")
    assert.strictEqual(parseErr("Name: x\n").line, 1)
    assert.strictEqual(parseErr("name:\n").line, 1)
  })

  it("is an Effect failure when yielded", () =>
    Effect.runPromise(
      Effect.gen(function*() {
        const error = yield* Effect.flip(VmConfig.parse("oops\n"))
        assert.strictEqual(error.line, 1)
      })
    ))
})

describe("editing", () => {
  it("inserts a lock line where Proxmox's sorted writer puts it and removes it again", () => {
    const config = parseOk(configs.seabios)
    const locked = Either.getOrThrow(VmConfig.setProperty(config, "lock", "backup"))
    assert.strictEqual(VmConfig.main(locked).lock, "backup")
    assert.strictEqual(
      VmConfig.serialize(locked),
      configs.seabios.replace("ide2: none,media=cdrom\n", "ide2: none,media=cdrom\nlock: backup\n")
    )
    const unlocked = Either.getOrThrow(VmConfig.deleteProperty(locked, "lock"))
    assert.strictEqual(VmConfig.serialize(unlocked), configs.seabios)
    assert.strictEqual(VmConfig.main(unlocked).lock, undefined)
  })

  it("keeps the sections after the main config untouched", () => {
    const config = parseOk(configs.full.replace("lock: backup\n", ""))
    const locked = Either.getOrThrow(VmConfig.setProperty(config, "lock", "backup"))
    assert.strictEqual(VmConfig.serialize(locked), configs.full)
  })

  it("replaces an existing value in place and appends after the last property", () => {
    const config = parseOk("#desc\nname: a\nmemory: 512\n\n[snap]\nname: b\n")
    const renamed = Either.getOrThrow(VmConfig.setProperty(config, "name", "c"))
    assert.strictEqual(VmConfig.serialize(renamed), "#desc\nname: c\nmemory: 512\n\n[snap]\nname: b\n")
    const appended = Either.getOrThrow(VmConfig.setProperty(config, "vmgenid", "x"))
    assert.strictEqual(VmConfig.serialize(appended), "#desc\nname: a\nmemory: 512\nvmgenid: x\n\n[snap]\nname: b\n")
    const inSnapshot = Either.getOrThrow(
      VmConfig.setProperty(config, "lock", "snapshot", { section: VmConfig.snapshots(config)[0] })
    )
    assert.strictEqual(
      VmConfig.serialize(inSnapshot),
      "#desc\nname: a\nmemory: 512\n\n[snap]\nlock: snapshot\nname: b\n"
    )
    const onlyComments = Either.getOrThrow(VmConfig.setProperty(parseOk("#just a note\n"), "lock", "backup"))
    assert.strictEqual(VmConfig.serialize(onlyComments), "#just a note\nlock: backup\n")
    assert.strictEqual(
      VmConfig.serialize(Either.getOrThrow(VmConfig.setProperty(parseOk(""), "name", "x"))),
      "name: x\n"
    )
  })

  it("re-validates edits", () => {
    const config = parseOk("name: a\n")
    const bad = VmConfig.setProperty(config, "scsi0", "local:vm-1-disk-0,size=huge")
    assert.strictEqual(Either.isLeft(bad), true)
  })
})

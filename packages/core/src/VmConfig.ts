/**
 * Proxmox qemu-server config files (`/etc/pve/qemu-server/<vmid>.conf`): `key: value` lines,
 * `#` comment lines (the percent-encoded description), `[snapshot]` sections, `[PENDING]` and
 * `[special:…]` sections. Parsing follows `PVE::QemuServer::parse_vm_config` in strict mode; every
 * line is kept as written, so `serialize(parse(text))` gives back `text` byte for byte and unknown
 * keys survive edits.
 *
 * Drive values (`scsi0: local-lvm:vm-100-disk-0,iothread=1,size=32G,backup=0`) are decoded with
 * Schema for the options vzdump reads; unknown drive options are kept verbatim.
 *
 * @since 0.1.0
 */
import * as Either from "effect/Either"
import * as ParseResult from "effect/ParseResult"
import * as Schema from "effect/Schema"
import * as propertyString from "./internal/propertyString.js"
import { formatDiskSize, parseDiskSize } from "./VzdumpLog.js"

// ---------------------------------------------------------------------------------------------
// errors
// ---------------------------------------------------------------------------------------------

/**
 * A line of a config file that Proxmox would reject.
 *
 * @since 0.1.0
 * @category errors
 */
export class VmConfigParseError extends Schema.TaggedError<VmConfigParseError>("@vzdump/core/VmConfigParseError")(
  "VmConfigParseError",
  {
    /** 1-based line number. */
    line: Schema.Number,
    /** The line as written. */
    text: Schema.String,
    reason: Schema.String,
    path: Schema.optional(Schema.String)
  }
) {
  override get message(): string {
    return `${this.path ?? "config"} line ${this.line}: ${this.reason}: '${this.text}'`
  }
}

// ---------------------------------------------------------------------------------------------
// schemas for values
// ---------------------------------------------------------------------------------------------

/**
 * A Proxmox boolean: `1|on|yes|true` / `0|off|no|false` (any case) ↔ `boolean`; encodes as `1`/`0`.
 *
 * @since 0.1.0
 * @category schemas
 */
export const PveBoolean = Schema.transformOrFail(Schema.String, Schema.Boolean, {
  strict: true,
  decode: (text, _, ast) =>
    /^(1|on|yes|true)$/i.test(text)
      ? ParseResult.succeed(true)
      : /^(0|off|no|false)$/i.test(text)
      ? ParseResult.succeed(false)
      : ParseResult.fail(new ParseResult.Type(ast, text, `expected a boolean, got '${text}'`)),
  encode: (value) => ParseResult.succeed(value ? "1" : "0")
}).annotations({ identifier: "PveBoolean" })

/**
 * A disk size (`32G`, `512M`, `1T`, `4K`, `1.5G`, bytes) ↔ bytes; encodes with the largest exact
 * unit as Proxmox does.
 *
 * @since 0.1.0
 * @category schemas
 */
export const DiskSize = Schema.transformOrFail(Schema.String, Schema.NonNegativeInt, {
  strict: true,
  decode: (text, _, ast) => {
    const bytes = parseDiskSize(text)
    return bytes === undefined
      ? ParseResult.fail(new ParseResult.Type(ast, text, `value does not look like a valid disk size: ${text}`))
      : ParseResult.succeed(bytes)
  },
  encode: (bytes) => ParseResult.succeed(formatDiskSize(bytes))
}).annotations({ identifier: "DiskSize" })

/**
 * The image formats a drive's `format=` may name.
 *
 * @since 0.1.0
 * @category schemas
 */
export const ImageFormat = Schema.Literal("raw", "qcow", "qed", "qcow2", "vmdk", "cloop")

const oneOf = <const L extends ReadonlyArray<string>>(...values: L) =>
  Schema.Literal(...values).annotations({
    message: (issue) => ({
      message: `expected ${values.join(" | ")}, got '${String(issue.actual)}'`,
      override: true
    })
  })

const opt = <A, I>(schema: Schema.Schema<A, I>) => Schema.optionalWith(schema, { exact: true })

const DriveFields = Schema.Struct({
  file: Schema.String,
  media: opt(oneOf("cdrom", "disk")),
  size: opt(DiskSize),
  backup: opt(PveBoolean),
  format: opt(oneOf("raw", "qcow", "qed", "qcow2", "vmdk", "cloop")),
  iothread: opt(PveBoolean),
  replicate: opt(PveBoolean),
  shared: opt(PveBoolean),
  ro: opt(PveBoolean),
  efitype: opt(oneOf("2m", "4m")),
  version: opt(oneOf("v1.2", "v2.0"))
})

const AgentFields = Schema.Struct({
  enabled: opt(PveBoolean),
  fstrim_cloned_disks: opt(PveBoolean),
  "freeze-fs": opt(PveBoolean),
  type: opt(oneOf("virtio", "isa"))
})

const MemoryFields = Schema.Struct({ current: Schema.NumberFromString.pipe(Schema.int(), Schema.positive()) })

const PositiveIntString = Schema.NumberFromString.pipe(Schema.int(), Schema.positive())

const Bios = oneOf("seabios", "ovmf")

const decodeError = (error: ParseResult.ParseError): string =>
  ParseResult.ArrayFormatter.formatErrorSync(error).map((issue) =>
    issue.path.length === 0 ? issue.message : `${issue.path.join(".")}: ${issue.message}`
  ).join("; ")

// ---------------------------------------------------------------------------------------------
// models
// ---------------------------------------------------------------------------------------------

/**
 * @since 0.1.0
 * @category models
 */
export type DriveInterface = "ide" | "sata" | "scsi" | "virtio" | "efidisk" | "tpmstate" | "unused"

const driveLimits: Record<DriveInterface, number> = {
  ide: 4,
  sata: 6,
  scsi: 31,
  virtio: 16,
  efidisk: 1,
  tpmstate: 1,
  unused: 256
}

/**
 * A drive line (`scsi0`, `efidisk0`, `tpmstate0`, `unused3`, …) decoded.
 *
 * @since 0.1.0
 * @category models
 */
export interface Drive {
  /** `scsi0`; a legacy `cdrom:` line is `ide2`. */
  readonly key: string
  readonly interface: DriveInterface
  readonly index: number
  /** Volume id (`local-lvm:vm-100-disk-0`), absolute path, `none` or `cdrom`. */
  readonly file: string
  readonly media: "cdrom" | "disk" | undefined
  /** `size=` in bytes (informational in Proxmox). */
  readonly size: number | undefined
  /** `backup=`; `undefined` when not written (vzdump then includes the drive). */
  readonly backup: boolean | undefined
  readonly format: typeof ImageFormat.Type | undefined
  readonly isCdrom: boolean
  /** All `key=value` options as written (the volume under `file`), aliases resolved. */
  readonly options: ReadonlyArray<readonly [string, string]>
  /** The value as written. */
  readonly value: string
}

/**
 * The `agent:` property.
 *
 * @since 0.1.0
 * @category models
 */
export interface AgentOptions {
  readonly enabled: boolean
  readonly fstrimClonedDisks: boolean | undefined
  /** `freeze-fs=` (aliases `freeze-fs-on-backup`, `guest-fsfreeze`); `undefined` means freeze. */
  readonly freezeFs: boolean | undefined
  readonly type: "virtio" | "isa" | undefined
}

/**
 * @since 0.1.0
 * @category models
 */
export type SectionKind = "main" | "pending" | "snapshot" | "special"

/**
 * One line of a config file.
 *
 * @since 0.1.0
 * @category models
 */
export type ConfigLine =
  | { readonly _tag: "Blank"; readonly line: number; readonly raw: string }
  /** `text` is the percent-decoded comment. */
  | { readonly _tag: "Comment"; readonly line: number; readonly raw: string; readonly text: string }
  | {
    readonly _tag: "Property"
    readonly line: number
    readonly raw: string
    readonly key: string
    readonly value: string
  }

/**
 * A section: the main config, `[PENDING]`, a snapshot or a `[special:…]` section.
 *
 * @since 0.1.0
 * @category models
 */
export interface Section {
  readonly kind: SectionKind
  /** `""` for main, `pending`, the snapshot name, or the special name (`cloudinit`). */
  readonly name: string
  /** The header line as written (`[snap1]`); `undefined` for main. */
  readonly header: string | undefined
  readonly headerLine: number | undefined
  readonly lines: ReadonlyArray<ConfigLine>
  /** Comment lines and `description:`, percent-decoded, trailing whitespace removed. */
  readonly description: string | undefined
  /** Properties in file order (a key written twice appears twice; `get` returns the last). */
  readonly properties: ReadonlyArray<readonly [string, string]>
  /** Drives in vzdump's order (ide, scsi, virtio, sata, efidisk0, tpmstate0, then unusedN). */
  readonly drives: ReadonlyArray<Drive>
  /** `name:` (the guest name). */
  readonly guestName: string | undefined
  readonly bios: "seabios" | "ovmf" | undefined
  readonly agent: AgentOptions | undefined
  readonly template: boolean
  readonly lock: string | undefined
  /** MiB. */
  readonly memory: number | undefined
  readonly cores: number | undefined
  readonly sockets: number | undefined
  readonly machine: string | undefined
  readonly ostype: string | undefined
  readonly parent: string | undefined
}

/**
 * A parsed config file.
 *
 * @since 0.1.0
 * @category models
 */
export interface VmConfig {
  readonly vmid: number | undefined
  readonly path: string | undefined
  /** `sections[0]` is the main config; the others in file order. */
  readonly sections: ReadonlyArray<Section>
  readonly trailingNewline: boolean
}

// ---------------------------------------------------------------------------------------------
// description encoding
// ---------------------------------------------------------------------------------------------

/**
 * `PVE::Tools::decode_text`: `%XX` escapes to bytes, then UTF-8.
 *
 * @since 0.1.0
 * @category description
 */
export const decodeText = (text: string): string => {
  if (!text.includes("%")) return text
  const bytes = Buffer.from(text, "utf8")
  const out: Array<number> = []
  for (let i = 0; i < bytes.length; i++) {
    const b = bytes[i]!
    if (b === 0x25 && i + 2 < bytes.length && isHex(bytes[i + 1]) && isHex(bytes[i + 2])) {
      out.push(parseInt(String.fromCharCode(bytes[i + 1]!, bytes[i + 2]!), 16))
      i += 2
    } else {
      out.push(b)
    }
  }
  return new TextDecoder("utf-8").decode(Uint8Array.from(out))
}

const isHex = (b: number | undefined): boolean =>
  b !== undefined && ((b >= 0x30 && b <= 0x39) || (b >= 0x41 && b <= 0x46) || (b >= 0x61 && b <= 0x66))

/**
 * `PVE::Tools::encode_text`: UTF-8, then every byte outside `0x20–0x39`, `0x3b–0x7e` (control
 * characters, 8-bit bytes and `:`) as `%XX`.
 *
 * @since 0.1.0
 * @category description
 */
export const encodeText = (text: string): string => {
  let out = ""
  for (const b of Buffer.from(text, "utf8")) {
    out += (b >= 0x20 && b <= 0x39) || (b >= 0x3b && b <= 0x7e)
      ? String.fromCharCode(b)
      : `%${b.toString(16).toUpperCase().padStart(2, "0")}`
  }
  return out
}

// ---------------------------------------------------------------------------------------------
// drives and property values
// ---------------------------------------------------------------------------------------------

/**
 * Whether `key` names a drive (`ide0-3`, `sata0-5`, `scsi0-30`, `virtio0-15`, `efidisk0`, `tpmstate0`,
 * `unused0-255`).
 *
 * @since 0.1.0
 * @category drives
 */
export const isDriveKey = (key: string): boolean => driveKeyParts(key) !== undefined

const driveKeyParts = (key: string): { readonly iface: DriveInterface; readonly index: number } | undefined => {
  const m = /^(ide|sata|scsi|virtio|efidisk|tpmstate|unused)(\d+)$/.exec(key)
  if (m === null) return undefined
  const iface = m[1] as DriveInterface
  const index = Number(m[2])
  if (m[2]!.length > 1 && m[2]!.startsWith("0")) return undefined
  return index < driveLimits[iface] ? { iface, index } : undefined
}

/**
 * The drive keys in vzdump's iteration order (`PVE::QemuServer::Drive::valid_drive_names`):
 * ide0-3, scsi0-30, virtio0-15, sata0-5, efidisk0, tpmstate0.
 *
 * @since 0.1.0
 * @category drives
 */
export const driveKeys: ReadonlyArray<string> = [
  ...Array.from({ length: 4 }, (_, i) => `ide${i}`),
  ...Array.from({ length: 31 }, (_, i) => `scsi${i}`),
  ...Array.from({ length: 16 }, (_, i) => `virtio${i}`),
  ...Array.from({ length: 6 }, (_, i) => `sata${i}`),
  "efidisk0",
  "tpmstate0"
]

const driveOrder = new Map<string, number>([
  ...driveKeys.map((key, i) => [key, i] as const),
  ...Array.from({ length: 256 }, (_, i) => [`unused${i}`, driveKeys.length + i] as const)
])

const volumeIdPattern = /^[a-z][a-z0-9\-_.]*[a-z0-9]:.+$/i

/**
 * Decodes a drive value for `key`. Returns the reason when Proxmox would reject it.
 *
 * @since 0.1.0
 * @category drives
 */
export const parseDrive = (key: string, value: string): Either.Either<Drive, string> => {
  const parts = driveKeyParts(key === "cdrom" ? "ide2" : key)
  if (parts === undefined) return Either.left(`invalid drive key: ${key}`)
  const split = propertyString.parse(value, "file", { volume: "file" })
  if (typeof split === "string") return Either.left(split)
  const decoded = Schema.decodeUnknownEither(DriveFields)(split.record, { onExcessProperty: "ignore" })
  if (Either.isLeft(decoded)) return Either.left(decodeError(decoded.left))
  const fields = decoded.right
  const file = fields.file
  if (!(volumeIdPattern.test(file) || file.startsWith("/") || file === "none" || file === "cdrom")) {
    return Either.left(`invalid volume '${file}'`)
  }
  if (parts.iface === "unused" && !volumeIdPattern.test(file)) {
    return Either.left(`unused volume '${file}' is not a volume id`)
  }
  if (fields.media === "cdrom" && parts.iface === "virtio") return Either.left("virtio drives cannot be CD-ROMs")
  return Either.right({
    key: `${parts.iface}${parts.index}`,
    interface: parts.iface,
    index: parts.index,
    file,
    media: fields.media,
    size: fields.size,
    backup: fields.backup,
    format: fields.format,
    isCdrom: fields.media === "cdrom",
    options: split.pairs,
    value
  })
}

/**
 * Decodes an `agent:` value (`1`, `0`, `enabled=1,fstrim_cloned_disks=1`, `1,freeze-fs-on-backup=0`).
 * Like Proxmox, a disabled agent ignores its other options.
 *
 * @since 0.1.0
 * @category agent
 */
export const parseAgent = (value: string): Either.Either<AgentOptions, string> => {
  const split = propertyString.parse(value, "enabled", {
    "freeze-fs-on-backup": "freeze-fs",
    "guest-fsfreeze": "freeze-fs"
  })
  if (typeof split === "string") return Either.left(split)
  const unknown = Object.keys(split.record).find((k) => !(k in AgentFields.fields))
  if (unknown !== undefined) return Either.left(`invalid key in comma-separated list property: ${unknown}`)
  return Either.map(
    Either.mapLeft(Schema.decodeUnknownEither(AgentFields)(split.record), decodeError),
    (fields): AgentOptions =>
      fields.enabled === true
        ? {
          enabled: true,
          fstrimClonedDisks: fields.fstrim_cloned_disks,
          freezeFs: fields["freeze-fs"],
          type: fields.type
        }
        : { enabled: false, fstrimClonedDisks: undefined, freezeFs: undefined, type: undefined }
  )
}

/**
 * Whether vzdump freezes the guest's filesystems: the agent is enabled and `freeze-fs` is not off.
 *
 * @since 0.1.0
 * @category agent
 */
export const shouldFreezeFs = (agent: AgentOptions | undefined): boolean =>
  agent !== undefined && agent.enabled && agent.freezeFs !== false

// ---------------------------------------------------------------------------------------------
// parsing
// ---------------------------------------------------------------------------------------------

interface RawSection {
  readonly kind: SectionKind
  readonly name: string
  readonly header: string | undefined
  readonly headerLine: number | undefined
  readonly lines: Array<ConfigLine>
}

const propertyPattern = /^([a-z][a-z_-]*\d*):\s*(.+?)\s*$/

const fail = (line: number, text: string, reason: string, path: string | undefined) =>
  Either.left(new VmConfigParseError({ line, text, reason, ...(path === undefined ? {} : { path }) }))

const analyze = (raw: RawSection, path: string | undefined): Either.Either<Section, VmConfigParseError> => {
  let description: string | undefined
  const properties: Array<readonly [string, string]> = []
  const drives: Array<Drive> = []
  const last: Record<string, { readonly value: string; readonly line: ConfigLine }> = {}
  const validate = raw.kind !== "special"
  for (const line of raw.lines) {
    if (line._tag === "Blank") continue
    if (line._tag === "Comment") {
      description = (description ?? "") + line.text + "\n"
      continue
    }
    if (line.key === "description") {
      description = (description ?? "") + decodeText(line.value)
      continue
    }
    if (line.key === "delete" && raw.kind !== "pending") {
      return fail(line.line, line.raw, "property 'delete' is only allowed in [PENDING]", path)
    }
    properties.push([line.key, line.value])
    last[line.key] = { value: line.value, line }
    if (!validate) continue
    if (line.key === "cdrom" || /^(ide|sata|scsi|virtio|efidisk|tpmstate|unused)\d+$/.test(line.key)) {
      const drive = parseDrive(line.key, line.value)
      if (Either.isLeft(drive)) {
        return fail(line.line, line.raw, `unable to parse value of '${line.key}' - ${drive.left}`, path)
      }
      drives.push(drive.right)
    }
  }
  const value = (key: string) => last[key]?.value
  const checked = <A>(
    key: string,
    decode: (value: string) => Either.Either<A, string>
  ): Either.Either<A | undefined, VmConfigParseError> => {
    const entry = last[key]
    if (entry === undefined || !validate) return Either.right(undefined)
    return Either.mapLeft(
      decode(entry.value),
      (reason) =>
        new VmConfigParseError({
          line: entry.line.line,
          text: entry.line.raw,
          reason: `unable to parse value of '${key}' - ${reason}`,
          ...(path === undefined ? {} : { path })
        })
    )
  }
  const schema = <A, I>(s: Schema.Schema<A, I>) => (input: unknown) =>
    Either.mapLeft(Schema.decodeUnknownEither(s)(input), decodeError)
  return Either.gen(function*() {
    const agent = yield* checked("agent", parseAgent)
    const bios = yield* checked("bios", schema(Bios))
    const template = yield* checked("template", schema(PveBoolean))
    const cores = yield* checked("cores", schema(PositiveIntString))
    const sockets = yield* checked("sockets", schema(PositiveIntString))
    const memory = yield* checked("memory", (text) => {
      const split = propertyString.parse(text, "current")
      if (typeof split === "string") return Either.left(split)
      return Either.map(schema(MemoryFields)(split.record), (m) => m.current)
    })
    // a key written twice: the last line wins, as in Proxmox's hash
    const byKey = new Map<string, Drive>()
    for (const d of drives) byKey.set(d.key, d)
    const uniqueDrives = [...byKey.values()].sort((a, b) => driveOrder.get(a.key)! - driveOrder.get(b.key)!)
    return {
      kind: raw.kind,
      name: raw.name,
      header: raw.header,
      headerLine: raw.headerLine,
      lines: raw.lines,
      description: description === undefined ? undefined : description.replace(/\s+$/, ""),
      properties,
      drives: uniqueDrives,
      guestName: value("name"),
      bios,
      agent,
      template: template === true,
      lock: value("lock"),
      memory,
      cores,
      sockets,
      machine: value("machine"),
      ostype: value("ostype"),
      parent: value("parent")
    }
  })
}

/**
 * Parses a config file. Fails with the first line Proxmox would reject: an unparsable line, a
 * duplicate or unknown section, `delete:` outside `[PENDING]`, a drive, `agent`, `bios`, `memory`,
 * `cores`, `sockets` or `template` value that does not decode. `[special:…]` sections are not
 * validated (Proxmox treats them as informative). `vmid`/`path` are kept for messages and callers.
 *
 * @since 0.1.0
 * @category parsing
 */
export const parse = (
  text: string,
  options?: { readonly vmid?: number | undefined; readonly path?: string | undefined }
): Either.Either<VmConfig, VmConfigParseError> => {
  const path = options?.path
  const trailingNewline = text.endsWith("\n")
  const body = trailingNewline ? text.slice(0, -1) : text
  const rawLines = text.length === 0 ? [] : body.split("\n")
  const sections: Array<RawSection> = [{ kind: "main", name: "", header: undefined, headerLine: undefined, lines: [] }]
  const seen = new Set<string>()
  for (let i = 0; i < rawLines.length; i++) {
    const raw = rawLines[i]!
    const line = i + 1
    const current = sections[sections.length - 1]!
    if (/^\s*$/.test(raw)) {
      current.lines.push({ _tag: "Blank", line, raw })
      continue
    }
    const header = /^\[([^\]]*)\]\s*$/.exec(raw)
    if (header !== null) {
      const title = header[1]!
      let kind: SectionKind
      let name: string
      let special: RegExpExecArray | null
      if (/^PENDING$/i.test(title)) {
        kind = "pending"
        name = "pending"
      } else if ((special = /^special:([a-z][a-z0-9_-]*)$/i.exec(title)) !== null) {
        kind = "special"
        name = special[1]!
      } else if (/^[a-z][a-z0-9_-]+$/i.test(title)) {
        kind = "snapshot"
        name = title
      } else {
        return fail(line, raw, `unknown section: '${title}'`, path)
      }
      const id = `${kind}:${kind === "snapshot" ? name : name.toLowerCase()}`
      if (seen.has(id)) {
        const what = kind === "pending" ? "section" : kind === "special" ? "special section" : "snapshot section"
        return fail(line, raw, `duplicate ${what}: ${name}`, path)
      }
      seen.add(id)
      sections.push({ kind, name, header: raw, headerLine: line, lines: [] })
      continue
    }
    const comment = /^#(.*)$/.exec(raw)
    if (comment !== null) {
      current.lines.push({ _tag: "Comment", line, raw, text: decodeText(comment[1]!) })
      continue
    }
    const property = propertyPattern.exec(raw)
    if (property === null) return fail(line, raw, "unable to parse config", path)
    current.lines.push({ _tag: "Property", line, raw, key: property[1]!, value: property[2]! })
  }
  const analyzed: Array<Section> = []
  for (const raw of sections) {
    const section = analyze(raw, path)
    if (Either.isLeft(section)) return Either.left(section.left)
    analyzed.push(section.right)
  }
  return Either.right({ vmid: options?.vmid, path, sections: analyzed, trailingNewline })
}

/**
 * The file text: every line as written, edited lines as `key: value`.
 *
 * @since 0.1.0
 * @category serializing
 */
export const serialize = (config: VmConfig): string => {
  const out: Array<string> = []
  for (const section of config.sections) {
    if (section.header !== undefined) out.push(section.header)
    for (const line of section.lines) out.push(line.raw)
  }
  if (out.length === 0) return ""
  return out.join("\n") + (config.trailingNewline ? "\n" : "")
}

// ---------------------------------------------------------------------------------------------
// access
// ---------------------------------------------------------------------------------------------

/**
 * @since 0.1.0
 * @category access
 */
export const main = (config: VmConfig): Section => config.sections[0]!

/**
 * @since 0.1.0
 * @category access
 */
export const pending = (config: VmConfig): Section | undefined => config.sections.find((s) => s.kind === "pending")

/**
 * @since 0.1.0
 * @category access
 */
export const snapshots = (config: VmConfig): ReadonlyArray<Section> =>
  config.sections.filter((s) => s.kind === "snapshot")

/**
 * A `[special:<name>]` section (`cloudinit`, `fleecing`).
 *
 * @since 0.1.0
 * @category access
 */
export const special = (config: VmConfig, name: string): Section | undefined =>
  config.sections.find((s) => s.kind === "special" && s.name.toLowerCase() === name.toLowerCase())

/**
 * The value of `key` in a section (the last line if written twice).
 *
 * @since 0.1.0
 * @category access
 */
export const get = (section: Section, key: string): string | undefined => {
  for (let i = section.properties.length - 1; i >= 0; i--) {
    const [k, v] = section.properties[i]!
    if (k === key) return v
  }
  return undefined
}

/**
 * A drive of a section by key (`scsi0`; `ide2` also finds a legacy `cdrom:` line).
 *
 * @since 0.1.0
 * @category access
 */
export const drive = (section: Section, key: string): Drive | undefined => section.drives.find((d) => d.key === key)

/**
 * `name:` of the main config.
 *
 * @since 0.1.0
 * @category access
 */
export const name = (config: VmConfig): string | undefined => main(config).guestName

/**
 * `template: 1` in the main config.
 *
 * @since 0.1.0
 * @category access
 */
export const isTemplate = (config: VmConfig): boolean => main(config).template

// ---------------------------------------------------------------------------------------------
// editing
// ---------------------------------------------------------------------------------------------

const sectionIndex = (config: VmConfig, section: Section | undefined): number => {
  if (section === undefined) return 0
  const index = config.sections.indexOf(section)
  return index < 0 ? 0 : index
}

const reparse = (config: VmConfig, sections: ReadonlyArray<{ header?: string | undefined; lines: Array<string> }>) => {
  const out: Array<string> = []
  for (const s of sections) {
    if (s.header !== undefined) out.push(s.header)
    out.push(...s.lines)
  }
  const wasEmpty = config.sections.every((s) => s.header === undefined && s.lines.length === 0)
  const text = out.length === 0 ? "" : out.join("\n") + (config.trailingNewline || wasEmpty ? "\n" : "")
  return parse(text, { vmid: config.vmid, path: config.path })
}

const editable = (config: VmConfig) =>
  config.sections.map((s) => ({ header: s.header, lines: s.lines.map((l) => l.raw), source: s }))

/**
 * Sets `key: value` in a section (main by default). An existing line is replaced in place (the
 * last one if written twice, earlier duplicates removed); a new line goes where Proxmox's sorted
 * writer would put it: before the first property whose key sorts after `key`. The result is
 * parsed again, so an invalid value fails.
 *
 * @since 0.1.0
 * @category editing
 */
export const setProperty = (
  config: VmConfig,
  key: string,
  value: string,
  options?: { readonly section?: Section | undefined }
): Either.Either<VmConfig, VmConfigParseError> => {
  const index = sectionIndex(config, options?.section)
  const sections = editable(config)
  const target = sections[index]!
  const lines = target.source.lines
  const text = `${key}: ${value}`
  const matching = lines.flatMap((l, i) => l._tag === "Property" && l.key === key ? [i] : [])
  if (matching.length > 0) {
    const keep = matching[matching.length - 1]!
    target.lines = lines.flatMap((l, i) => i === keep ? [text] : matching.includes(i) ? [] : [l.raw])
  } else {
    let at = lines.findIndex((l) => l._tag === "Property" && l.key > key)
    if (at < 0) {
      let lastContent = -1
      lines.forEach((l, i) => {
        if (l._tag !== "Blank") lastContent = i
      })
      at = lastContent + 1
    }
    target.lines = [...target.lines.slice(0, at), text, ...target.lines.slice(at)]
  }
  return reparse(config, sections)
}

/**
 * Removes every `key:` line of a section (main by default).
 *
 * @since 0.1.0
 * @category editing
 */
export const deleteProperty = (
  config: VmConfig,
  key: string,
  options?: { readonly section?: Section | undefined }
): Either.Either<VmConfig, VmConfigParseError> => {
  const index = sectionIndex(config, options?.section)
  const sections = editable(config)
  const target = sections[index]!
  target.lines = target.source.lines.flatMap((l) => l._tag === "Property" && l.key === key ? [] : [l.raw])
  return reparse(config, sections)
}

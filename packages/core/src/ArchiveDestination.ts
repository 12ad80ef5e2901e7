/**
 * Where an engine that writes the archive itself sends it. With Proxmox's patched QEMU the `backup`
 * QMP command produces the whole VMA stream (or uploads to a Proxmox Backup Server) inside QEMU, so
 * the engine cannot use `ArchiveSession.writeData`; instead the target describes the destination
 * and keeps the parts only it knows: the names, the compressor, the temp file, the config files
 * and, on `commit`, the rename to the final name.
 *
 * A session that supports this carries a `destination` next to the `ArchiveSession` members
 * ({@link DestinationSession}); {@link destinationOf} reads it from any session. Targets for the
 * stock engine simply have none.
 *
 * @since 0.1.0
 */
import type * as Redacted from "effect/Redacted"
import type { ArchiveSession } from "./BackupTarget.js"
import type { Compressor } from "./VzdumpNames.js"

/**
 * A line the engine adds to the backup log when it starts (the target's words, e.g. `enabling
 * encryption` or a warning about the storage configuration).
 *
 * @since 0.1.0
 * @category models
 */
export interface DestinationMessage {
  readonly level: "info" | "warn"
  readonly message: string
}

/**
 * A VMA file on a directory storage (or dump directory), as vzdump writes it: QEMU's stream goes
 * through `compressor` (stdin → stdout) into `temporaryPath` (`….vma.dat`); the session's `commit`
 * renames it to `path`, and closing the session without `commit` removes it.
 *
 * @since 0.1.0
 * @category models
 */
export interface VmaFileDestination {
  readonly _tag: "VmaFile"
  /** The final archive, e.g. `<dumpdir>/vzdump-qemu-100-2026_11_27-10_00_00.vma.zst`. */
  readonly path: string
  /** The name written while the backup runs (`….vma.dat`). */
  readonly temporaryPath: string
  /** vzdump's compressor command; `undefined` writes the VMA stream as it is. */
  readonly compressor: Compressor | undefined
  /** Host path of the assembled `qemu-server.conf` (QEMU reads it: `config-file`). */
  readonly configFile: string
  /** Host path of `qemu-server.fw`, when the VM has a firewall config (`firewall-file`). */
  readonly firewallFile: string | undefined
  readonly messages: ReadonlyArray<DestinationMessage>
}

/**
 * A Proxmox Backup Server snapshot `vm/<backupId>/<backupTime>`, uploaded by QEMU itself
 * (`format: pbs`). Secrets are `Redacted`; they reach QEMU's `backup` command and nothing else.
 *
 * @since 0.1.0
 * @category models
 */
export interface PbsDestination {
  readonly _tag: "Pbs"
  /** `user@realm@host[:port]:datastore`. */
  readonly repository: string
  /** The VMID as a string. */
  readonly backupId: string
  /** Unix epoch seconds of the backup start. */
  readonly backupTime: number
  readonly namespace: string | undefined
  readonly password: Redacted.Redacted<string>
  /** The server's TLS certificate fingerprint. */
  readonly fingerprint: string | undefined
  /** Host path of the client-side encryption key (`/etc/pve/priv/storage/<id>.enc`). */
  readonly keyfile: string | undefined
  /** Password of `keyfile` (Proxmox VE stores its keys unprotected and never sets it). */
  readonly keyPassword: Redacted.Redacted<string> | undefined
  /** Host path of the RSA master public key (`/etc/pve/priv/storage/<id>.master.pem`). */
  readonly masterKeyfile: string | undefined
  /** vzdump always passes it: `true` exactly when there is a `keyfile`. */
  readonly encrypt: boolean
  readonly configFile: string
  readonly firewallFile: string | undefined
  readonly messages: ReadonlyArray<DestinationMessage>
}

/**
 * @since 0.1.0
 * @category models
 */
export type ArchiveDestination = VmaFileDestination | PbsDestination

/**
 * An archive session that also describes its destination.
 *
 * @since 0.1.0
 * @category models
 */
export interface DestinationSession extends ArchiveSession {
  readonly destination: ArchiveDestination
}

const isDestination = (u: unknown): u is ArchiveDestination =>
  typeof u === "object" && u !== null && "_tag" in u && (u._tag === "VmaFile" || u._tag === "Pbs")

/**
 * The destination of a session, if its target offers one.
 *
 * @since 0.1.0
 * @category utils
 */
export const destinationOf = (session: ArchiveSession): ArchiveDestination | undefined => {
  const candidate = (session as Partial<DestinationSession>).destination
  return isDestination(candidate) ? candidate : undefined
}

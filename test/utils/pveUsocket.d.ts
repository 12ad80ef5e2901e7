/**
 * Types for the parts of the native `usocket` addon the Proxmox-QEMU emulator uses (its QMP server
 * side, `UServer`). The package ships no types; `packages/qmp` declares the client side for itself.
 */
declare module "usocket" {
  import { Duplex } from "node:stream"
  import { EventEmitter } from "node:events"

  /** A connected Unix stream socket; emits `fds` with descriptors received by `SCM_RIGHTS`. */
  export class USocket extends Duplex {
    constructor(options?: { readonly path?: string; readonly fd?: number })
    fd?: number
    connect(pathOrOptions: string | { readonly path?: string; readonly fd?: number }, callback?: () => void): void
    override write(
      chunk: Buffer | string | Array<number> | { readonly data?: Buffer; readonly fds?: Array<number> },
      encoding?: BufferEncoding | ((error?: Error | null) => void) | null,
      callback?: (error?: Error | null) => void
    ): boolean
    override destroy(): this
  }

  /** A listening Unix socket whose `connection` events carry `USocket`s. */
  export class UServer extends EventEmitter {
    listen(path: string, backlog?: number, callback?: () => void): void
    close(): void
  }
}

/**
 * Splits a byte stream into JSON lines. QEMU ends lines with `\r\n`, qemu-ga with `\n`; both are accepted.
 * With `delimiter0xFF`, a `0xFF` byte (never part of UTF-8) drops the partial line before it and is reported,
 * which is how the guest agent marks the reply to `guest-sync-delimited`.
 * @internal
 */

/** @internal */
export type Token =
  | { readonly _tag: "Line"; readonly text: string }
  | { readonly _tag: "Delimiter" }

/** @internal */
export interface PushResult {
  readonly tokens: ReadonlyArray<Token>
  /** The unterminated line grew beyond `maxLineBytes`. */
  readonly overflow: boolean
}

const NEWLINE = 0x0a
const DELIMITER = 0xff
const delimiterToken: Token = { _tag: "Delimiter" }

/** @internal */
export class LineFramer {
  private parts: Array<Uint8Array> = []
  private size = 0
  private readonly decoder = new TextDecoder()

  constructor(readonly options: { readonly delimiter0xFF: boolean; readonly maxLineBytes: number }) {}

  /** Bytes of an unterminated line held back. */
  get pendingBytes(): number {
    return this.size
  }

  push(chunk: Uint8Array): PushResult {
    const tokens: Array<Token> = []
    let start = 0
    for (let i = 0; i < chunk.length; i++) {
      const byte = chunk[i]
      if (byte === NEWLINE) {
        const text = this.take(chunk.subarray(start, i))
        const trimmed = text.trim()
        if (trimmed.length > 0) tokens.push({ _tag: "Line", text: trimmed })
        start = i + 1
      } else if (byte === DELIMITER && this.options.delimiter0xFF) {
        this.parts = []
        this.size = 0
        tokens.push(delimiterToken)
        start = i + 1
      }
    }
    if (start < chunk.length) {
      const rest = chunk.slice(start)
      this.parts.push(rest)
      this.size += rest.length
    }
    return { tokens, overflow: this.size > this.options.maxLineBytes }
  }

  private take(last: Uint8Array): string {
    if (this.parts.length === 0) return this.decoder.decode(last)
    const all = new Uint8Array(this.size + last.length)
    let offset = 0
    for (const part of this.parts) {
      all.set(part, offset)
      offset += part.length
    }
    all.set(last, offset)
    this.parts = []
    this.size = 0
    return this.decoder.decode(all)
  }
}

/**
 * Proxmox property strings (`local-lvm:vm-100-disk-0,iothread=1,size=32G`), split the way
 * `PVE::JSONSchema::parse_property_string` splits them.
 *
 * @internal
 */

/** A parsed property string: pairs in written order, aliases already resolved. */
export interface PropertyPairs {
  readonly pairs: ReadonlyArray<readonly [string, string]>
  readonly record: Readonly<Record<string, string>>
}

/**
 * Splits `data` at commas. `key=value` parts set `key` (after `aliases`); a part without `=` sets
 * `defaultKey`. Returns an error text on duplicate keys, a missing key or a keyless part without a
 * default key.
 */
export const parse = (
  data: string,
  defaultKey: string | undefined,
  aliases: Readonly<Record<string, string>> = {}
): PropertyPairs | string => {
  const pairs: Array<readonly [string, string]> = []
  const record: Record<string, string> = {}
  const seen = new Set<string>()
  let defaultSet = false
  for (const part of data.split(",")) {
    if (/^\s*$/.test(part)) continue
    const kv = /^([^=]+)=(.+)$/s.exec(part)
    if (kv !== null) {
      const written = kv[1]!
      if (seen.has(written)) return `duplicate key in comma-separated list property: ${written}`
      seen.add(written)
      const key = aliases[written] ?? written
      pairs.push([key, kv[2]!])
      record[key] = kv[2]!
    } else if (!part.includes("=")) {
      if (defaultKey === undefined) return "value without key, but schema does not define a default key"
      if (defaultSet || record[defaultKey] !== undefined) {
        return `duplicate key in comma-separated list property: ${defaultKey}`
      }
      defaultSet = true
      pairs.push([defaultKey, part])
      record[defaultKey] = part
    } else {
      return "missing key in comma-separated list property"
    }
  }
  return { pairs, record }
}

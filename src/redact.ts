/**
 * Makes a URL safe to show or store: the password in its user-info is
 * replaced. One place, so every caller redacts the same way.
 */
export function redactUrl(url: string): string {
  return url.replace(/^([a-z][a-z0-9+.-]*:\/\/[^:/@]*:)[^@]*@/i, '$1***@');
}

// Offline support: the app shell and the wasm package are cached at install and served from the cache when the
// network is gone (network first while online, so updates arrive). Model files are cached by lorag itself (Cache
// API, after their size and integrity checks) and knowledge packs live in OPFS (or IndexedDB). Network first means
// a changed file is picked up on the next online load; renaming SHELL (a release) also clears the old copies.
const SHELL = "lorag-www-v4";
// Relative to this script: the app and its copy of the package (www/pkg), all inside this worker's scope, so the
// module Worker (a client of its own, matched by its URL) is controlled too.
const FILES = [
  "./", "./index.html", "./app.js", "./style.css",
  "./pkg/worker-client.js", "./pkg/core.js", "./pkg/worker.js", "./pkg/web.js", "./pkg/browser-storage.js",
  "./pkg/web/lorag.js", "./pkg/web/lorag_bg.wasm",
].map((f) => new URL(f, self.location).pathname);

self.addEventListener("install", (e) => e.waitUntil(caches.open(SHELL).then((c) => c.addAll(FILES)).then(() => self.skipWaiting())));
// A new version of this script (SHELL renamed) drops the shell caches of older ones once it takes over.
self.addEventListener("activate", (e) =>
  e.waitUntil(
    caches
      .keys()
      .then((keys) => Promise.all(keys.filter((k) => k.startsWith("lorag-www-") && k !== SHELL).map((k) => caches.delete(k))))
      .then(() => self.clients.claim()),
  ),
);
self.addEventListener("fetch", (e) => {
  const req = e.request;
  if (req.method !== "GET" || new URL(req.url).origin !== location.origin) return;
  e.respondWith(
    fetch(req)
      .then((res) => {
        if (res.ok && FILES.includes(new URL(req.url).pathname)) {
          const copy = res.clone();
          caches.open(SHELL).then((c) => c.put(req, copy));
        }
        return res;
      })
      .catch(async () => (await caches.match(req, { ignoreSearch: true })) ?? Response.error()),
  );
});

// The page: hands texts to the worker, exposes the answer to the test driver.
const worker = new Worker("/tests/browser/worker.js", { type: "module" });
window.runInWorker = (texts) =>
  new Promise((resolve) => {
    worker.onmessage = ({ data }) => resolve(data);
    worker.onerror = (e) => resolve({ ok: false, error: e.message });
    worker.postMessage({ texts });
  });

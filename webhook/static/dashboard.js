// kling-relay dashboard: ask before a form marked data-confirm is sent; refresh the element marked data-live.
document.addEventListener("submit", function (event) {
  var message = event.target.getAttribute("data-confirm");
  if (message && !window.confirm(message)) { event.preventDefault(); }
});
(function () {
  var live = document.querySelector("[data-live]");
  if (!live) { return; }
  window.setInterval(function () {
    if (document.hidden) { return; }
    fetch(window.location.href, {credentials: "same-origin", headers: {"Accept": "text/html"}})
      .then(function (response) { return response.ok ? response.text() : null; })
      .then(function (html) {
        if (!html) { return; }
        var fresh = new DOMParser().parseFromString(html, "text/html").querySelector("[data-live]");
        if (fresh) { live.replaceChildren.apply(live, Array.from(fresh.childNodes)); }
      })
      .catch(function () {});
  }, 5000);
})();

// Scrolling without a page load: the range input swaps the slice PNG. Without this script the
// range input and its Go button, and the arrow links, do the same through the server.
(function () {
  var range = document.getElementById("k"), img = document.getElementById("slice");
  var number = document.getElementById("slice-number");
  if (!range || !img) return;
  range.addEventListener("input", function () {
    img.src = img.dataset.base + range.value + ".png?" + img.dataset.query;
    if (number) number.textContent = String(Number(range.value) + 1);
  });
})();

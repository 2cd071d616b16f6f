# Makes the tiny RData fixtures used by tests/test_geo.py and tests/test_scripts.py. Run once with Debian's r-base-core +
# r-cran-matrix:  cd tests/data && Rscript make_rdata.R   && gzip -n -f *.RData  (GEO-style: gzip around a gzip save()).
library(Matrix)
raw_counts <- sparseMatrix(i = c(1, 3, 2, 5, 4, 1), j = c(1, 1, 2, 3, 4, 4), x = c(3, 1, 7, 2, 5, 1),
                           dims = c(5, 4),
                           dimnames = list(c("GENE_A", "GENE_B", "MT-CO1", "GENE_D", "GENE_E"),
                                           c("AAAC-1", "AAAG-1", "AACT-1", "AAGT-1")))
stopifnot(is(raw_counts, "dgCMatrix"))
save(raw_counts, file = "tiny_counts.RData", compress = "gzip")
write.csv(as.matrix(raw_counts), "tiny_counts_expected.csv")

metadata <- data.frame(cell = c("a", "b"), n = c(1L, 2L))
notes <- "no matrix here"
save(metadata, notes, file = "no_matrix.RData", compress = "gzip")

raw_counts <- sparseMatrix(i = c(1, 2), j = c(1, 2), x = c(0.5, 2), dims = c(2, 2),
                           dimnames = list(c("G1", "G2"), c("C1", "C2")))
save(raw_counts, file = "fractional_counts.RData", compress = "gzip")

# sim_counts: 300 cells x 150 genes of negative-binomial counts in three types, for the
# end-to-end test of every stage (tests/test_scripts.py). The type is the barcode's prefix.
set.seed(123)
n_genes <- 150
sizes <- c(alpha = 120, beta = 100, gamma = 80)
base <- rlnorm(n_genes, meanlog = 0, sdlog = 1.2)
types <- rep(names(sizes), sizes)
effect <- matrix(rlnorm(length(sizes) * n_genes, 0, 1), nrow = length(sizes), dimnames = list(names(sizes)))
library_size <- rlnorm(length(types), 0, 0.3)
mu <- t(effect[types, ] * base[col(effect[types, ])] * library_size)
counts <- matrix(rnbinom(length(mu), size = 2, mu = mu), nrow = n_genes)
genes <- c(sprintf("GENE%03d", seq_len(n_genes - 2)), "MT-CO1", "MT-ND1")
barcodes <- sprintf("%s_%03d", types, seq_along(types))
raw_counts <- as(Matrix(counts, sparse = TRUE, dimnames = list(genes, barcodes)), "CsparseMatrix")
stopifnot(is(raw_counts, "dgCMatrix"))
save(raw_counts, file = "sim_counts.RData", compress = "gzip")
